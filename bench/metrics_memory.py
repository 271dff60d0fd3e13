"""Benchmark: what the verdicts and the scoring metrics cost as the test split grows. For each N (default 100k and
1M test pairs) synthetic scored parts are written as the scoring actors write them (pair_id, query_id, gold, label,
score, dominant_perspective; 8 parts, rows in another order than the split's) for 2 variants x 3 seeds, then a
fresh process computes what the student stage computes from them: metrics_from_parts (the task the stage runs),
each run's predictions joined on pair_id (aligned_predictions) and the paired bootstrap. Peak RSS of that process
and the seconds of each step per N; the ratio between sizes says how memory grows.

    .venv/bin/python bench/metrics_memory.py [--sizes 100000 1000000] [--resamples 2000] [--docs]

Writes bench/results/metrics_memory.json (docs/metrics_memory.json with --docs) and prints one summary line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CODES = ["E", "S", "C", "I"]
RUNS = [(v, s) for v in ("lrkd", "lam0") for s in (0, 1, 2)]


def _write(work: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    ids = np.array([f"p{i:08d}" for i in range(n)], dtype=object)
    gold = rng.integers(0, 4, n)
    split = pa.table({"pair_id": pa.array(ids, pa.string()), "query_id": pa.array([f"q{i // 10}" for i in range(n)]),
                      "label": pa.array(np.array(CODES, dtype=object)[gold], pa.string())})
    pq.write_table(split, work / "test.parquet")
    for v, s in RUNS:
        keep = 0.6 if v == "lrkd" else 0.58
        pred = np.where(rng.random(n) < keep, gold, rng.integers(0, 4, n))
        order = rng.permutation(n)
        out = work / f"{v}-{s}"
        out.mkdir()
        for i, part in enumerate(np.array_split(order, 8)):
            pq.write_table(pa.table({
                "pair_id": pa.array(ids[part], pa.string()), "query_id": split.column("query_id").take(pa.array(part)),
                "gold": pa.array(np.array(CODES, dtype=object)[gold[part]], pa.string()),
                "label": pa.array(np.array(CODES, dtype=object)[pred[part]], pa.string()),
                "score": pa.array(rng.random(len(part)).astype(np.float32)),
                "dominant_perspective": pa.array(["user_intent"] * len(part), pa.string())}), out / f"part-{i:05d}.parquet")


def _measure(work: str, resamples: int, queue) -> None:
    """In a fresh process: the stage's metrics of one student, then the paired verdict of 2 variants x 3 seeds."""
    import pyarrow.parquet as pq

    from student.evaluate import paired_bootstrap
    from student.score import aligned_predictions, metrics_from_parts

    work = Path(work)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    m = metrics_from_parts(work / "lrkd-0", CODES, ["user_intent"], {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0},
                           order=str(work / "test.parquet"))
    t1 = time.time()
    peak_metrics = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    test = pq.read_table(work / "test.parquet", columns=["pair_id", "label"])
    ids = test.column("pair_id").combine_chunks()
    gold = [CODES.index(x) for x in test.column("label").to_pylist()]
    preds = {v: {s: aligned_predictions(work / f"{v}-{s}", ids, CODES) for vv, s in RUNS if vv == v} for v in ("lrkd", "lam0")}
    t2 = time.time()
    verdict = paired_bootstrap(gold, preds["lrkd"], preds["lam0"], 4, resamples)
    t3 = time.time()
    queue.put({"metrics_seconds": round(t1 - t0, 1), "align_seconds": round(t2 - t1, 1), "bootstrap_seconds": round(t3 - t2, 1),
               "baseline_rss_mib": round(base / 1024), "peak_rss_after_metrics_mib": round(peak_metrics / 1024),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "macro_f1": m["macro_f1"], "verdict": verdict["verdict"], "ci95": verdict["ci95"]})


def main() -> int:
    from hardware.cpu import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/thinkbroad-metrics-memory")
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args()
    sizes = {}
    for n in args.sizes:
        work = Path(args.workdir) / str(n)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _write(work, n)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(str(work), args.resamples, q))
        p.start()
        sizes[n] = q.get()
        p.join()
        shutil.rmtree(work, ignore_errors=True)
        print(f"{n} test pairs: {sizes[n]}", flush=True)
    result = {"bench": "metrics_memory", "machine": machine(), "resamples": args.resamples, "runs": len(RUNS), "sizes": sizes}
    lo, hi = min(sizes), max(sizes)
    growth = (sizes[hi]["peak_rss_mib"] - sizes[hi]["baseline_rss_mib"]) / max(sizes[lo]["peak_rss_mib"] - sizes[lo]["baseline_rss_mib"], 1)
    result["above_baseline_growth"] = round(growth, 2)
    out = ROOT / "bench" / "results" / "metrics_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        (ROOT / "docs" / "metrics_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    s = result["sizes"]
    lo, hi = min(s, key=int), max(s, key=int)
    return (f"metrics memory: {int(lo):,} -> {int(hi):,} test pairs ({result['runs']} runs, {result['resamples']} resamples): "
            f"peak RSS {s[lo]['peak_rss_mib']} -> {s[hi]['peak_rss_mib']} MiB (above the {s[hi]['baseline_rss_mib']} MiB "
            f"baseline: {result['above_baseline_growth']}x for {int(hi) // int(lo)}x the pairs); metrics "
            f"{s[hi]['metrics_seconds']} s, join {s[hi]['align_seconds']} s, bootstrap {s[hi]['bootstrap_seconds']} s at {int(hi):,}")


if __name__ == "__main__":
    raise SystemExit(main())
