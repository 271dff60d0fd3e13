"""Cross-validation by query: every pair a test pair exactly once, no query on two sides of a fold."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.data import SPLITS
from workflows.folds import pooled_gold, query_folds, write_folds


def _splits(tmp_path, n=120):
    rows = [{"pair_id": f"p{i}", "query_id": f"q{i // 3}", "query": f"query {i // 3}", "title": f"t{i}", "attributes": "{}",
             "label": "ESCI"[i % 4]} for i in range(n)]
    paths = {}
    for j, split in enumerate(("train", "val", "test")):
        paths[split] = tmp_path / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[j::3]), paths[split])
    return paths, rows


def fold_of_pairs(fold_paths: list[dict[str, Path]]) -> pa.Table:
    """pair_id -> fold, split (for checks and reports)."""
    parts = []
    for f, p in enumerate(fold_paths):
        for split in SPLITS:
            ids = pq.read_table(p[split], columns=["pair_id"]).column("pair_id")
            parts.append(pa.table({"pair_id": ids, "fold": pa.array([f] * len(ids), pa.int32()),
                                   "split": pa.array([split] * len(ids), pa.string())}))
    return pa.concat_tables(parts).sort_by([("fold", "ascending"), ("pair_id", "ascending")]) if parts else pa.table({})


def test_every_pair_is_a_test_pair_once_and_queries_never_straddle(tmp_path):
    paths, rows = _splits(tmp_path)
    folds = write_folds(paths, 4, seed=0, out_dir=tmp_path / "cv", batch_rows=7)
    table = fold_of_pairs(folds)
    test = [p for p, s in zip(table.column("pair_id").to_pylist(), table.column("split").to_pylist()) if s == "test"]
    assert sorted(test) == sorted(r["pair_id"] for r in rows)  # each pair tested exactly once
    query = {r["pair_id"]: r["query_id"] for r in rows}
    for f, p in enumerate(folds):
        sides = {s: {query[x] for x in pq.read_table(p[s]).column("pair_id").to_pylist()} for s in ("train", "val", "test")}
        assert not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"]) and not (sides["train"] & sides["val"])
        assert sum(pq.ParquetFile(p[s]).metadata.num_rows for s in ("train", "val", "test")) == len(rows)
        assert sides["val"] and sides["train"]
    ids, gold = pooled_gold(folds, list("ESCI"))
    assert len(ids) == len(rows) == len(gold) and gold[ids.index("p5")] == "ESCI".index("S")
    # seeded: the same folds again, other ones with another seed
    assert query_folds([r["query_id"] for r in rows], 4, 0) == query_folds([r["query_id"] for r in rows], 4, 0)
    assert query_folds([r["query_id"] for r in rows], 4, 0) != query_folds([r["query_id"] for r in rows], 4, 1)
    with pytest.raises(ValueError, match="cannot fill 50 folds"):
        query_folds([r["query_id"] for r in rows], 50, 0)
