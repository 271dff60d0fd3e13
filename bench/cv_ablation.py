"""Benchmark: does LRKD beat the plain cross-encoder, under cross-validation? `thinkbroad distill` with
distill.cv_folds = K on configs/local.yaml (the bundled ESCI sample, SmolLM2 teacher, MiniLM student): every labelled
pair a test pair once, each variant and seed trained K times (once per fold), the pooled test macro-F1 per variant,
and the paired verdicts over folds x seeds: LRKD against vanilla (does distilling pay?) and against its lambda = 0
twin (does the guidance term act?), each with the configured equivalence margin.

    .venv/bin/python bench/cv_ablation.py [--folds 3] [--seeds 0 1] [--variants vanilla lrkd-poly-unified lrkd-poly-unified-lam0] [--docs]

Resumable: the distill stage reuses every fold student already trained, so a second call only rebuilds the report.
Writes bench/results/cv_ablation.json (and docs/cv_ablation.json with --docs: the README's table and summary line
are rendered from it by `python -m bench.docs_tables`) and prints one summary line.
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


def main() -> int:
    from hardware.cpu import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["vanilla", "lrkd-poly-unified", "lrkd-poly-unified-lam0"],
                    help="the main variants to train (default: LRKD, its lambda = 0 twin and vanilla)")
    ap.add_argument("--docs", action="store_true", help="also write docs/cv_ablation.json (the README's figures)")
    args = ap.parse_args()
    from workflows.config import load_config
    from workflows.stages.common import run_dir_for

    cfg = load_config(ROOT / args.config)
    run = Path(run_dir_for(cfg, args.run_dir))
    run = run if run.is_absolute() else ROOT / run
    cmd = [sys.executable, str(ROOT / "bench" / "_code_parity_distill.py"), ",".join(args.variants), "distill",
           "--config", args.config, "--set", f"distill.cv_folds={args.folds}", "--set", f"distill.seeds={sorted(args.seeds)}"]
    if args.run_dir:
        cmd += ["--run-dir", args.run_dir]
    print(f"[cv_ablation] {machine()['cpu']}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    report = json.loads((Path(run) / "student" / "cv" / "metrics.json").read_text())
    out = {**machine(), "config": args.config, "seeds": sorted(args.seeds), "cv_folds": report["cv_folds"],
           "test_pairs": report["test_pairs"], "fold_test_pairs": report["fold_test_pairs"], "seconds": round(time.time() - t0, 1),
           "margin": cfg.distill.equivalence_margin, "variants": report["variants"],
           "verdicts": report["verdicts"], "vanilla_verdicts": report["vanilla_verdicts"]}
    path = ROOT / "bench" / "results" / "cv_ablation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    if args.docs:
        (ROOT / "docs" / "cv_ablation.json").write_text(json.dumps(out, indent=2))
    print(f"{summary(out)} -> {path}")
    return 0


def summary(out: dict) -> str:
    """The one-line summary the bench prints (and the README quotes) from its results."""
    parts = [f"{name} - {r['against']} {r['mean_diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] {r['verdict']}"
             for group in ("vanilla_verdicts", "verdicts") for name, r in out[group].items()]
    return (f"cv_ablation ({len(out['seeds'])} seeds x {out['cv_folds']} folds, {out['test_pairs']} test pairs, "
            f"margin ±{out['margin']:g}): " + "; ".join(parts))


def table(out: dict) -> str:
    """The README's table (Markdown): pooled test macro-F1, accuracy and validation macro-F1 per variant, mean ± std
    over seeds."""
    lines = ["| variant | seeds × folds | test macro-F1 | test accuracy | val macro-F1 (mean over folds) |", "|---|---|---|---|---|"]
    for name, s in out["variants"].items():
        cell = lambda k: f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if k in s else ""  # noqa: E731
        lines.append(f"| {name} | {len(s['seeds'])} × {out['cv_folds']} | {cell('macro_f1')} | {cell('accuracy')} | "
                     f"{cell('val_macro_f1')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
