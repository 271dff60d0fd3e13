"""Cross-validation by query: every pair a test pair exactly once, no query on two sides of a fold."""
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from student.train import Variant
from pairs.splits import SPLITS
from pairs.folds import pooled_gold, query_folds, write_folds


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


@pytest.mark.ray
def test_cross_validated_distill_pools_every_pair_once(tmp_path, ray_local, monkeypatch, capsys):
    """distill.cv_folds = 2 on label_text targets (no LLM): each fold's students train without its test pairs' targets,
    every labelled pair is scored once by a student that never trained on it, the verdicts pool the folds, and a
    rerun trains nothing."""
    import hashlib

    from student.score import aligned_predictions
    from workflows.config import load_config
    from workflows.stages.cv import distill_cv

    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/smoke.yaml", [
        "distill.cv_folds=2", "distill.target_source=label_text", "distill.max_target_pairs=40", "distill.fidelity_pairs=8",
        "distill.train={num_workers: 2, epochs: 1, batch_size: 32, learning_rate: 1.0e-3, latent_dim: 16, poly_codes: 6}"])
    run = tmp_path / "run"
    d = cfg.distill
    variants = [Variant("vanilla", "vanilla", seed=0), d.lrkd("poly", "unified", 0.1, 0)]
    report = json.loads(distill_cv(cfg, run, variants).read_text())
    out = capsys.readouterr().out  # every fold's students in one worker group, which scores them too
    assert re.findall(r"students: (\d+) to train", out) == ["4"] and "scored on the validation and test splits by the same workers" in out, out[-3000:]
    splits = {s: pq.read_table(run / "data" / f"{s}.parquet", columns=["pair_id", "query_id"]) for s in SPLITS}
    everything = set(pa.concat_tables(splits.values()).column("pair_id").to_pylist())
    assert report["test_pairs"] == len(everything) == sum(report["fold_test_pairs"])
    # targets drawn from every split (the test split's pairs train in some fold), about (40 + 8) x 2 pairs in all
    base = run / "student" / "targets" / "label_text-cv2" / "targets.parquet"
    tagged = pq.read_table(base, columns=["pair_id", "split"])
    assert set(tagged.column("split").to_pylist()) == {"train", "val", "test"}
    assert 90 <= len(set(tagged.column("pair_id").to_pylist())) <= 100
    tests = []
    for f in range(2):
        fold = run / "student" / "cv" / "splits" / f"fold-{f}"
        test_ids = set(pq.read_table(fold / "test.parquet").column("pair_id").to_pylist())
        train_ids = set(pq.read_table(fold / "train.parquet").column("pair_id").to_pylist())
        tests.append(test_ids)
        view = pq.read_table(run / "student" / "cv" / f"fold-{f}" / "targets" / "label_text-cv2" / "targets.parquet")
        ids = set(view.column("pair_id").to_pylist())
        assert ids and not ids & test_ids  # no student learns from its test pairs' targets
        assert {p for p, s in zip(view.column("pair_id").to_pylist(), view.column("split").to_pylist()) if s == "train"} == ids & train_ids
        # the queries of a test fold are nowhere else in that fold
        q = lambda name: set(pq.read_table(fold / name, columns=["query_id"]).column("query_id").to_pylist())  # noqa: E731
        assert not q("test.parquet") & (q("train.parquet") | q("val.parquet"))
    assert not tests[0] & tests[1] and tests[0] | tests[1] == everything
    # the pooled macro-F1 is that of the fold students' own predictions, pair for pair
    codes = [lab.name for lab in cfg.labels]
    run0 = next(r for r in report["runs"] if r["variant"] == "vanilla")
    gold, pred = [], []
    for f, folder in enumerate(run0["predictions"]):
        t = pq.read_table(run / "student" / "cv" / "splits" / f"fold-{f}" / "test.parquet", columns=["pair_id", "label"])
        gold += [codes.index(c) for c in t.column("label").to_pylist()]
        pred += aligned_predictions(folder, t.column("pair_id").combine_chunks(), codes).tolist()
    from sklearn.metrics import f1_score

    assert run0["metrics"]["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", labels=range(len(codes)), zero_division=0))
    v = report["vanilla_verdicts"]["lrkd-poly-unified"]
    assert v["against"] == "vanilla" and v["test_pairs"] == len(everything) and v["seeds"] == [0]
    # nothing changed: nothing retrained
    digest = lambda: {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)  # noqa: E731
                      for p in sorted((run / "student" / "cv").rglob("model.safetensors"))}
    before = digest()
    assert len(before) >= 4
    distill_cv(cfg, run, variants)
    assert digest() == before
