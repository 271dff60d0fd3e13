"""k-fold cross-validation by query over every labelled pair: each pair is a test pair exactly once, so a paired
comparison pools all of them (folds x seeds) instead of one small test split.

Fold f: test = the queries of fold f; val = a seeded share of the other queries (for early stopping and selection);
train = the rest. Queries are assigned by a seeded permutation of their ids; the files are streamed (a bounded
number of rows at a time), each fold's splits written as RUN_DIR-style Parquet files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairs.splits import SPLITS


def query_folds(query_ids: list[str], k: int, seed: int) -> dict[str, int]:
    """Each distinct query id -> its fold (0..k-1): a seeded permutation dealt round robin (fold sizes differ by one
    query at most)."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {k}")
    uniq = sorted(set(query_ids))
    if len(uniq) < k:
        raise ValueError(f"{len(uniq)} queries cannot fill {k} folds: use fewer folds")
    order = np.random.default_rng([seed, 4]).permutation(len(uniq))
    return {uniq[i]: int(n % k) for n, i in enumerate(order)}


def write_folds(split_paths: dict[str, Path], k: int, seed: int, out_dir: str | Path, val_share: float = 1 / 9,
                batch_rows: int = 65_536) -> list[dict[str, Path]]:
    """The pairs of every prepared split, re-split into k folds by query -> out_dir/fold-<f>/{train,val,test}.parquet.
    Returns each fold's split paths. Memory: the query ids and one batch of rows."""
    out_dir = Path(out_dir)
    files = [split_paths[s] for s in SPLITS]
    queries = [q for f in files for q in pq.read_table(f, columns=["query_id"]).column("query_id").to_pylist()]
    fold = query_folds(queries, k, seed)
    # the validation queries of fold f: a seeded share of the queries outside it
    val_of: dict[int, set[str]] = {}
    for f in range(k):
        rest = sorted(q for q, g in fold.items() if g != f)
        n_val = max(1, round(val_share * len(rest)))
        val_of[f] = set(np.asarray(rest, dtype=object)[np.random.default_rng([seed, 5, f]).permutation(len(rest))[:n_val]])
    paths = [{s: out_dir / f"fold-{f}" / f"{s}.parquet" for s in SPLITS} for f in range(k)]
    writers: dict[tuple[int, str], pq.ParquetWriter] = {}
    schema = pq.read_schema(files[0])
    try:
        for path in files:
            for b in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                t = pa.Table.from_batches([b]).cast(schema)
                q = t.column("query_id").to_pylist()
                g = np.array([fold[x] for x in q])
                for f in range(k):
                    is_val = np.array([x in val_of[f] for x in q], dtype=bool)
                    for split, mask in (("test", g == f), ("val", (g != f) & is_val), ("train", (g != f) & ~is_val)):
                        if mask.any():
                            key = (f, split)
                            if key not in writers:
                                paths[f][split].parent.mkdir(parents=True, exist_ok=True)
                                writers[key] = pq.ParquetWriter(paths[f][split], schema)
                            writers[key].write_table(t.filter(pa.array(mask)))
    finally:
        for w in writers.values():
            w.close()
    for f in range(k):
        for split in SPLITS:
            if (f, split) not in writers:  # an empty split is still a file
                paths[f][split].parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(schema.empty_table(), paths[f][split])
    return paths


def pooled_gold(fold_paths: list[dict[str, Path]], codes: list[str]) -> tuple[list[str], list[int]]:
    """Every fold's test pairs in fold order: (pair ids, gold label indices), the order pooled predictions follow."""
    ids, gold = [], []
    for p in fold_paths:
        t = pq.read_table(p["test"], columns=["pair_id", "label"])
        ids += t.column("pair_id").to_pylist()
        gold += [codes.index(x) for x in t.column("label").to_pylist()]
    if len(set(ids)) != len(ids):
        raise ValueError("a pair is a test pair in more than one fold")
    return ids, gold
