"""Benchmark: the generate stage at many prompts — wall time, prompts/s and the driver's peak RSS.

Synthetic ESCI-layout pairs (`bench/synthetic.py`: distinct queries and products, ESCI's text lengths) are prepared
with `configs/esci.yaml` in a separate process (its memory is not counted), then `thinkbroad generate` runs in this
process with the tiny random teacher (`tiny-random-qwen2`, the smoke settings: json mode, 96 new tokens at most) on
the first N/3 training pairs x 3 perspectives. The driver's peak RSS is this process's VmHWM: Ray start, the engine
actor's start-up bookkeeping, task expansion, part writing, consolidation, stats and the SFT filter. Writes JSON and
prints one summary line with the CPU and the load average.

    .venv/bin/python bench/generation_scale.py --prompts 10000 100000 [--batch-size 64] [--work DIR]
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


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_one(prompts: int, data: Path, run_dir: Path, batch_size: int) -> dict:
    sets = ["teacher.model=tiny-random-qwen2", f"data.path={data / 'shopping_queries_dataset_examples.parquet'}",
            f"data.products.path={data / 'shopping_queries_dataset_products.parquet'}",
            f"generation.max_pairs={prompts // 3}", "generation.accelerator=cpu", "generation.concurrency=1",
            "generation.temperature=0.7", "generation.max_tokens=96", "generation.rationale_max_chars=40",
            f"generation.batch_size={batch_size}", "generation.engine={max_model_len: 2048}"]
    args = ["--config", str(ROOT / "configs" / "esci.yaml"), "--run-dir", str(run_dir)] + [x for s in sets for x in ("--set", s)]
    subprocess.run([sys.executable, "-m", "workflows.cli", "prepare", *args], cwd=ROOT, check=True, capture_output=True)
    from workflows.cli import main

    before = peak_rss_mb()
    load = os.getloadavg()
    t0 = time.time()
    if main(["generate", *args, "--no-progress"]) != 0:
        raise SystemExit("generate failed")
    wall = time.time() - t0
    out = run_dir / "mpcot"
    stats = json.loads((out / "stats.json").read_text())
    files = sorted((out / "rationales.parquet").glob("*.parquet"))
    return {"prompts": stats["rows"], "batch_size": batch_size, "seconds": round(wall, 1),
            "prompts_per_s": round(stats["rows"] / wall, 1),
            "generation_seconds": stats["throughput"]["seconds"],  # run_generation: engine start to consolidated
            "completion_tokens_per_s": stats["throughput"]["completion_tokens_per_s"],
            "driver_rss_mb_before": round(before), "driver_peak_rss_mb": round(peak_rss_mb()),
            "load_before": [round(x, 1) for x in load], "load_after": [round(x, 1) for x in os.getloadavg()],
            "rationales_files": len(files), "rationales_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--batch-size", type=int, default=64, help="generation.batch_size: prompts per vLLM call and part")
    p.add_argument("--work", default="/tmp/thinkbroad-generation-scale", help="synthetic data and run folders")
    p.add_argument("--_one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "generation_scale.json"))
    args = p.parse_args()
    work = Path(args.work)
    data = work / "esci"
    if args._one:
        print("RESULT " + json.dumps(run_one(args._one, data, work / f"run-{args._one}", args.batch_size)), flush=True)
        return 0
    from bench.synthetic import write_esci_like
    from hardware.cpu import machine

    # the training split holds about 63% of the pairs (30% of queries are ESCI's test split, val is 10% of the rest)
    write_esci_like(data, int(max(args.prompts) / 3 / 0.6) + 1000)
    results = []
    for n in args.prompts:  # each size in a fresh process: the peak RSS is that run's alone
        proc = subprocess.run([sys.executable, __file__, "--_one", str(n), "--batch-size", str(args.batch_size),
                               "--work", str(work)], cwd=ROOT, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"generation at {n} prompts failed (exit {proc.returncode})")
        results.append(json.loads(line[-1][7:]))
    summary = {"cpus": os.cpu_count(), **machine(), "runs": results}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print("generation scale (tiny-random-qwen2): " + ", ".join(
        f"{r['prompts']} prompts {r['seconds']:.0f} s {r['prompts_per_s']:.0f}/s driver peak {r['driver_peak_rss_mb']} MB"
        for r in results) + f"; {summary['cpu']}; load {summary['load_average']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
