"""Benchmark: did moving the student stage onto Ray Data (issue 17) change the student's quality? The same finished
run's split and teacher targets, the same seeds, trained by this code and by the code before the move (commit
1861686: every split built in the driver as Python lists and a dense target array, shipped through
`train_loop_config`). Test macro-F1 of each variant per seed and the paired bootstrap of new - old; also LRKD -
vanilla within each code. Goal: the difference holds 0 (quality unchanged), within the seed noise.

    .venv/bin/python bench/code_parity.py [--run runs/local] [--seeds 0 1 2] [--variants vanilla lrkd-poly-unified] [--cv]

--cv compares under the run's cross-validation instead of its test split: it needs a finished
`thinkbroad distill --config configs/local.yaml --set distill.cv_folds=K` of the run, whose fold students are this
code's side (nothing is retrained); the old code is given each fold's split and target view in turn, and the folds'
test pairs (every labelled pair once) are pooled in the verdicts (docs/code_parity_cv.json with --docs).

Needs a finished `make demo` run (its teacher targets are reused by both codes, so the comparison is of the student
stage alone). The old code is unpacked with `git archive` under --workdir and reads the same targets through a
manifest written with its own hashing (bench/_code_parity_old.py); only the listed variants are trained on either
side (bench/_code_parity_distill.py). Students already trained are reused on both sides (their stages are resumable),
so a second call only recomputes the comparison. Writes bench/results/code_parity.json (and docs/code_parity.json
with --docs: the README's table and summary line are rendered from it by `python -m bench.docs_tables`) and prints
one summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OLD = "1861686"


def _distill(tree: Path, run_dir: Path, seeds: list[int], variants: list[str], extra: list[str]) -> None:
    """`distill` of the code in `tree` (its working directory and import path), training only `variants`."""
    cmd = [sys.executable, str(ROOT / "bench" / "_code_parity_distill.py"), ",".join(variants), "distill",
           "--config", "configs/local.yaml", "--run-dir", str(run_dir), "--set", f"distill.seeds={seeds}", *extra]
    subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True)


def main() -> int:
    from hardware.cpu import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/local", help="a finished run of configs/local.yaml (make demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["vanilla", "lrkd-poly-unified"])
    ap.add_argument("--workdir", default="/tmp/thinkbroad-code-parity", help="where the old code is unpacked and runs")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--docs", action="store_true", help="also write docs/code_parity[_cv].json (the README's figures)")
    ap.add_argument("--cv", action="store_true", help="pool the folds of the run's cross-validated distill")
    ap.add_argument("--folds", type=int, default=3, help="with --cv: the run's distill.cv_folds")
    args = ap.parse_args()
    run = (ROOT / args.run).resolve()
    teacher = run / "teacher" / "dpo" / "model"
    if not args.cv and not (run / "student" / "targets" / "teacher" / "manifest.json").exists():
        raise SystemExit(f"{run}: no finished teacher targets; run `make demo` first")
    old_root = Path(args.workdir) / OLD
    if not (old_root / "workflows").is_dir():
        old_root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", OLD], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive, check=True)
    old_run = old_root / "runs" / "code-parity"
    seeds = sorted(args.seeds)
    print(f"[code_parity] {machine()['cpu']}", flush=True)
    if args.cv:
        return _cross_validated(args, run, teacher, old_root, seeds)
    subprocess.run([sys.executable, str(ROOT / "bench" / "_code_parity_old.py"), str(old_run), str(run), str(teacher)],
                   cwd=old_root, env={**os.environ, "PYTHONPATH": str(old_root)}, check=True)
    times = {}
    for side, cwd, run_dir, extra in (("old", old_root, old_run, ["--set", f"distill.teacher={teacher}"]),
                                      ("new", ROOT, run, [])):
        t0 = time.time()
        _distill(cwd, run_dir, seeds, args.variants, extra)
        times[side] = round(time.time() - t0, 1)

    import pyarrow.parquet as pq

    from workflows.config import load_config

    codes = [label.name for label in load_config(ROOT / "configs" / "local.yaml").labels]
    gold = [codes.index(c) for c in pq.read_table(run / "data" / "test.parquet").column("label").to_pylist()]
    metrics = {side: json.loads((d / "student" / "metrics.json").read_text()) for side, d in (("new", run), ("old", old_run))}

    from student.score import aligned_predictions

    ids = pq.read_table(run / "data" / "test.parquet", columns=["pair_id"]).column("pair_id").combine_chunks()

    def preds(side: str, variant: str) -> dict[int, list[int]]:
        """The old code kept per-pair predictions in metrics.json; this code reads them from the scored parts."""
        return {r["seed"]: r["metrics"]["predictions"] if "predictions" in r["metrics"]
                else aligned_predictions(r["predictions"], ids, codes).tolist()
                for r in metrics[side]["runs"] if r["variant"] == variant and r["seed"] in seeds}

    out = {**machine(), "old_commit": OLD, "run": str(run), "seeds": seeds, "test_pairs": len(gold), "distill_seconds": times}
    sides = {side: {v: preds(side, v) for v in args.variants} for side in ("new", "old")}
    return _compare(out, gold, sides, codes, args, "code_parity")


def _compare(out: dict, gold: list[int], sides: dict, codes: list[str], args, name: str, margin: float = 0.02) -> int:
    """Per variant: each side's macro-F1 per seed and new - old paired by seed; LRKD - vanilla within each side.
    `sides`: {"new"|"old": {variant: {seed: predictions in `gold`'s order}}} -> bench/results/<name>.json (+ docs/)."""
    import numpy as np

    from student.evaluate import macro_f1_fast, paired_bootstrap

    def f1(p: dict[int, list[int]]) -> dict[int, float]:
        return {s: round(float(macro_f1_fast(np.asarray([gold]), np.asarray([x]), len(codes))[0]), 4) for s, x in sorted(p.items())}

    new, old = sides["new"], sides["old"]
    out |= {"variants": {}, "lrkd_vs_vanilla": {}}
    for v in args.variants:
        out["variants"][v] = {"new": f1(new[v]), "old": f1(old[v]), "new_minus_old": paired_bootstrap(
            gold, new[v], old[v], len(codes), args.resamples, margin=margin)}
    if {"vanilla", "lrkd-poly-unified"} <= set(args.variants):
        for side, p in sides.items():
            out["lrkd_vs_vanilla"][side] = paired_bootstrap(gold, p["lrkd-poly-unified"], p["vanilla"], len(codes),
                                                            args.resamples, margin=margin)
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    if args.docs:
        (ROOT / "docs" / f"{name}.json").write_text(json.dumps(out, indent=2))
    print(f"{summary(out)} -> {path}")
    return 0


def _cross_validated(args, run: Path, teacher: Path, old_root: Path, seeds: list[int]) -> int:
    """The comparison over the run's cross-validation folds: the old code trained on each fold's split and target view
    (the run's CV targets restricted to the fold's train and val pairs, as workflows/stages/cv.py gives this code's
    fold students), then this code's fold students as the run's CV distill left them; predictions pooled over the
    folds in fold order. The old side needs only the CV splits and targets, so it may run while the CV distill
    trains; the comparison needs its report."""
    import numpy as np
    import pyarrow.parquet as pq

    from hardware.cpu import machine
    from student.score import aligned_predictions
    from workflows.config import load_config
    from workflows.stages.cv import retag_targets

    k = args.folds
    base = run / "student" / "targets" / f"teacher-cv{k}"
    folds = [run / "student" / "cv" / "splits" / f"fold-{f}" for f in range(k)]
    if not (base / "manifest.json").exists() or not all((f / "test.parquet").exists() for f in folds):
        raise SystemExit(f"{run}: no {k}-fold splits and targets yet; start `thinkbroad distill --config configs/local.yaml "
                         f"--set distill.cv_folds={k}` first (this bench can run once its targets are written)")
    codes = [label.name for label in load_config(ROOT / "configs" / "local.yaml").labels]
    tests = [pq.read_table(f / "test.parquet", columns=["pair_id", "label"]) for f in folds]
    gold = [codes.index(c) for t in tests for c in t.column("label").to_pylist()]
    ids = [t.column("pair_id").combine_chunks() for t in tests]
    t0 = time.time()
    old = {v: {s: [] for s in seeds} for v in args.variants}
    for f, fold in enumerate(folds):
        old_run = old_root / "runs" / f"code-parity-fold{f}"
        view = old_root / "runs" / f"code-parity-fold{f}-targets"
        if not view.exists():
            retag_targets(str(base / "targets.parquet"), {s: str(fold / f"{s}.parquet") for s in ("train", "val")}, str(view))
        subprocess.run([sys.executable, str(ROOT / "bench" / "_code_parity_old.py"), str(old_run), str(run), str(teacher),
                        str(fold), str(view / "part-00000.parquet"), str(base / "probe.json")], cwd=old_root,
                       env={**os.environ, "PYTHONPATH": str(old_root)}, check=True)
        _distill(old_root, old_run, seeds, args.variants, ["--set", f"distill.teacher={teacher}"])
        runs = json.loads((old_run / "student" / "metrics.json").read_text())["runs"]
        for r in runs:
            if r["variant"] in old and r["seed"] in seeds:
                if len(r["metrics"]["predictions"]) != len(ids[f]):
                    raise SystemExit(f"{old_run}: {r['variant']} seed {r['seed']} predicted {len(r['metrics']['predictions'])} "
                                     f"pairs of a {len(ids[f])}-pair test fold")
                old[r["variant"]][r["seed"]] += r["metrics"]["predictions"]
    old_seconds = round(time.time() - t0, 1)
    report_path = run / "student" / "cv" / "metrics.json"
    if not report_path.exists():
        raise SystemExit(f"old side done ({old_seconds} s); {report_path} is not written yet: rerun this bench once the "
                         "CV distill has finished (the old students are reused)")
    report = json.loads(report_path.read_text())
    new = {}
    for r in report["runs"]:
        if r["variant"] in args.variants and r["seed"] in seeds:
            new.setdefault(r["variant"], {})[r["seed"]] = np.concatenate(
                [aligned_predictions(p, i, codes) for p, i in zip(r["predictions"], ids)]).tolist()
    missing = [(v, s) for v in args.variants for s in seeds if s not in new.get(v, {})]
    if missing:
        raise SystemExit(f"{report_path}: no fold students for {missing}; rerun the CV distill with those seeds")
    margin = load_config(ROOT / "configs" / "local.yaml").distill.equivalence_margin
    out = {**machine(), "old_commit": OLD, "run": str(run), "seeds": seeds, "cv_folds": k, "test_pairs": len(gold),
           "old_distill_seconds": old_seconds}
    return _compare(out, gold, {"new": new, "old": old}, codes, args, "code_parity_cv", margin)


def summary(out: dict) -> str:
    """The one-line summary the bench prints (and the README quotes) from its results."""
    parts = []
    for v, r in out["variants"].items():
        d = r["new_minus_old"]
        parts.append(f"{v} new-old {d['mean_diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] {d['verdict']}")
    folds = f" x {out['cv_folds']} folds" if out.get("cv_folds") else ""
    return f"code_parity ({len(out['seeds'])} seeds{folds}, {out['test_pairs']} test pairs): " + "; ".join(parts)


def table(out: dict) -> str:
    """The README's table (Markdown): test macro-F1 per variant, code and seed, with mean ± sample std."""
    import statistics

    seeds = out["seeds"]
    lines = ["| variant | code | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|---|" + "---|" * len(seeds) + "---|"]
    for v, r in out["variants"].items():
        for side, code in (("new", "this code (Ray Data)"), ("old", f"{out['old_commit']} (driver lists)")):
            f1 = [r[side][str(s)] for s in seeds]
            spread = f"{statistics.mean(f1):.3f} ± {statistics.stdev(f1):.3f}" if len(f1) > 1 else f"{f1[0]:.3f}"
            lines.append(f"| {v} | {code} | " + " | ".join(f"{x:.3f}" for x in f1) + f" | {spread} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
