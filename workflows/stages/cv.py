"""Cross-validation of the student stage (`distill.cv_folds` = k > 1): comparisons that can answer.

One test split of a small sample holds too few pairs to tell two students apart. Here every labelled pair is a test
pair once: the run's splits are re-split into k folds by query (pairs/folds.py), every main variant and seed is
trained on each fold's train pairs (selected on its val pairs) and scored on its test pairs, and the paired verdicts
pool folds x seeds. The teacher is the run's (trained once, on the run's train split); its targets are drawn from
every split (targets.target_pairs), and each fold's students see only the targets of that fold's train and val pairs
(`fold_targets`). The report goes to RUN_DIR/student/cv/metrics.json; the student that is served and exported still
comes from a plain `distill` (one student per variant and seed, not k).

Layout: RUN_DIR/student/cv/splits/fold-<f>/{train,val,test}.parquet, and per fold RUN_DIR/student/cv/fold-<f>/
{targets,examples,variants}/ as RUN_DIR/student/ has them."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pairs.folds import write_folds
from pairs.splits import SPLITS
from workflows.artifacts import fingerprint, invalidate, is_fresh, write_json_atomic, write_manifest
from workflows.config import RunConfig
from workflows.stages.common import log, remote
from workflows.stages.prepare import prepare
from workflows.stages.verdicts import against_vanilla, metrics_table, verdict_lines, verdicts


VAL_SHARE = 1 / 9  # of the queries outside the test fold: the share the run's own split gives validation (0.1 / 0.9)


@dataclass(frozen=True)
class FoldView:
    """One fold of a cross-validated student stage: its split files and the folder its targets view, examples and
    students go to (RUN_DIR/student/cv/fold-<index>)."""

    index: int
    paths: dict[str, Path]
    root: Path


def fold_views(cfg: RunConfig, run_dir: Path) -> list[FoldView]:
    """The k folds of the run's labelled pairs (written once per split contents, fold count and seed)."""
    k = cfg.distill.cv_folds
    paths = prepare(cfg, run_dir)
    cv = run_dir / "student" / "cv"
    out = cv / "splits"
    key = hashlib.sha256(json.dumps(["folds", k, cfg.seed, VAL_SHARE]).encode()).hexdigest()[:16]
    inputs = {s: fingerprint(paths[s]) for s in SPLITS}
    if not is_fresh(out, key, inputs):
        invalidate(out)
        t0 = time.time()
        folds = remote(write_folds)({s: str(p) for s, p in paths.items()}, k, cfg.seed, str(out), VAL_SHARE)
        rows = [{s: pq.ParquetFile(p).metadata.num_rows for s, p in f.items()} for f in folds]
        write_manifest(out, "cv-folds", key, inputs, t0, folds=k, rows=rows)
        log(f"cv: {k} folds by query -> {out} (test pairs per fold: {', '.join(str(r['test']) for r in rows)})")
    return [FoldView(f, {s: out / f"fold-{f}" / f"{s}.parquet" for s in SPLITS}, cv / f"fold-{f}") for f in range(k)]


def retag_targets(targets: str, splits: dict[str, str], out: str) -> int:
    """The target rows of the pairs in `splits` (a fold's train and val files), their `split` set to the fold's,
    streamed into out/part-00000.parquet in the targets' own order; rows of other pairs (the fold's test pairs) are
    dropped. Memory: the targets' pair ids (a sample) and one batch."""
    from pairs.parquet import batches

    ids = pc.unique(pq.read_table(targets, columns=["pair_id"]).column("pair_id").combine_chunks())
    found_ids, found_split = [], []
    for split, path in splits.items():
        for b in batches(path, ["pair_id"]):
            mine = b.column("pair_id").filter(pc.is_in(b.column("pair_id"), value_set=ids))
            found_ids.append(mine.combine_chunks())
            found_split.append(pa.array([split] * len(mine), pa.string()))
    keys = pa.concat_arrays(found_ids) if found_ids else pa.array([], pa.string())
    where = pa.concat_arrays(found_split) if found_split else pa.array([], pa.string())
    Path(out).mkdir(parents=True, exist_ok=True)
    schema = pq.read_schema(next(iter(sorted(Path(targets).glob("*.parquet")))) if Path(targets).is_dir() else targets)
    n = 0
    with pq.ParquetWriter(Path(out) / "part-00000.parquet", schema) as writer:
        for b in batches(targets):
            pos = pc.index_in(b.column("pair_id"), value_set=keys)
            keep = pc.is_valid(pos)
            b = b.filter(keep)
            b = b.set_column(b.schema.get_field_index("split"), "split",
                             where.take(pos.filter(keep)).cast(schema.field("split").type))
            writer.write_table(b.select(schema.names).cast(schema))
            n += b.num_rows
    return n


def fold_targets(base: Path, fold: FoldView, base_fingerprint: str) -> Path:
    """The fold's view of a target source: fold.root/targets/<source>/targets.parquet/ (rebuilt when the targets or
    the fold's splits change)."""
    out = fold.root / "targets" / base.parent.name
    path = out / "targets.parquet"
    inputs = {"targets": base_fingerprint, "train": fingerprint(fold.paths["train"]), "val": fingerprint(fold.paths["val"])}
    if not is_fresh(out, "fold-view", inputs):
        invalidate(out)
        t0 = time.time()
        rows = remote(retag_targets)(str(base), {s: str(fold.paths[s]) for s in ("train", "val")}, str(path))
        write_manifest(out, "targets", "fold-view", inputs, t0, rows=rows, fold=fold.index, source=str(base))
    return path


def pooled_metrics(runs: list[dict], tests: list[pa.Table], codes: list[str]) -> list[dict]:
    """One run per (variant, seed) over every fold: test accuracy, macro-F1 and per-class F1 of the pooled
    predictions (each pair predicted by the fold's student that never trained on it), validation macro-F1 the mean
    over folds, and the list of fold prediction folders (the verdicts read them)."""
    from student.evaluate import classification_metrics
    from student.score import aligned_predictions

    ids = [t.column("pair_id").combine_chunks() for t in tests]
    gold = np.asarray([codes.index(c) for t in tests for c in t.column("label").to_pylist()])
    by: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        by.setdefault((r["variant"], r["seed"]), []).append(r)
    out = []
    for (variant, seed), rs in by.items():
        folders = [r["predictions"] for r in rs]
        pred = np.concatenate([aligned_predictions(f, i, codes) for f, i in zip(folders, ids)]).astype(np.int64)
        m = classification_metrics(gold, pred, codes, [])
        m.pop("predictions")
        m["val"] = {"macro_f1": float(np.mean([r["metrics"]["val"]["macro_f1"] for r in rs]))}
        m["folds"] = [{"macro_f1": r["metrics"]["macro_f1"], "n": r["metrics"]["n"],
                       "selected_epoch": r["metrics"].get("selected_epoch")} for r in rs]
        out.append({"variant": variant, "seed": seed, "metrics": m, "predictions": folders})
    return out


def cv_report(runs_by_fold: list[list[dict]], tests: list, codes: list[str], resamples: int, margin: float) -> dict:
    """The pooled report (run in a Ray task: neither the folds' test pairs nor the pooled predictions reach the
    driver). `tests`: each fold's test split file (or its pair_id and label columns as a table)."""
    from student.evaluate import aggregate

    tests = [t if isinstance(t, pa.Table) else pq.read_table(t, columns=["pair_id", "label"]) for t in tests]
    runs = pooled_metrics([r for fold in runs_by_fold for r in fold], tests, codes)
    names = {r["variant"] for r in runs}
    return {"split": f"{len(tests)}-fold cross-validation by query (every labelled pair a test pair once)",
            "cv_folds": len(tests), "test_pairs": sum(t.num_rows for t in tests),
            "fold_test_pairs": [t.num_rows for t in tests], "variants": aggregate(runs, codes),
            "verdicts": verdicts(runs, codes, resamples, tests, margin=margin),
            "vanilla_verdicts": verdicts(runs, codes, resamples, tests, against_vanilla(names), margin),
            "runs": runs}


def distill_cv(cfg: RunConfig, run_dir: Path, variants: list | None = None) -> Path:
    """Every main variant (or `variants`) and seed trained and scored on each fold -> RUN_DIR/student/cv/metrics.json
    (pooled test metrics, the paired verdicts over folds x seeds, each fold's own macro-F1)."""
    from workflows.stages.students import train_variant_sets

    folds = fold_views(cfg, run_dir)
    variants = variants or cfg.distill.main_variants()
    log(f"cv: {len(folds)} folds x {len(variants)} students, trained in one worker group and scored in one pass")
    runs_by_fold = train_variant_sets(cfg, run_dir, [(variants, None, fold) for fold in folds])
    codes = [lab.name for lab in cfg.labels]
    report = remote(cv_report)(runs_by_fold, [str(f.paths["test"]) for f in folds], codes, cfg.distill.bootstrap_resamples,
                               cfg.distill.equivalence_margin)
    path = run_dir / "student" / "cv" / "metrics.json"
    write_json_atomic(report, path)
    log(f"student ({report['split']}, {report['test_pairs']} test pairs; mean +- std over seeds):\n"
        + metrics_table(report["variants"]))
    log("paired verdicts (pooled test macro-F1 difference, 95% bootstrap interval over seeds and pairs):\n"
        + verdict_lines(report["verdicts"], report["vanilla_verdicts"]))
    return path
