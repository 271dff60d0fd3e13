"""Benchmark: teacher SFT throughput (tokens/s) and peak memory per worker, 1 vs 2 Ray Train workers and
DeepSpeed ZeRO-2 vs ZeRO-3, on the tiny smoke model with the same data and steps. Writes JSON, prints one line.

    .venv/bin/python bench/teacher_train.py [--steps 12] [--model tiny-random-qwen2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random-qwen2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "teacher_train.json"))
    args = p.parse_args()

    from teacher.config import SFTConfig
    from teacher.train import TrainJob, train_teacher
    from teacher_fixtures import write_sft  # hand-made SFT rows on real ESCI pairs
    from workflows.models import resolve_model
    from hardware.runtime import ensure_ray

    ensure_ray()
    model = resolve_model(args.model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_sft(Path(tmp) / "sft.parquet", n=args.rows)
        for workers, zero in ((1, 2), (2, 2), (1, 3), (2, 3)):
            # same global batch (4) for every setting, so the steps see the same tokens
            settings = SFTConfig(distributed={"num_workers": workers, "zero_stage": zero}, learning_rate=1e-3,
                                 max_steps=args.steps, per_device_batch_size=4 // workers, max_length=1024,
                                 save_steps=10**6, logging_steps=1).model_dump()
            res = train_teacher(TrainJob("sft", str(data), model, f"{tmp}/w{workers}z{zero}", settings))
            final = res.log_history[-1]
            tokens = max(h.get("num_tokens", 0) for h in res.log_history)
            name = f"workers{workers}_zero{zero}"
            results[name] = {
                "workers": workers, "zero_stage": zero, "steps": res.steps, "tokens": tokens,
                "train_runtime_s": final["train_runtime"], "tokens_per_s": tokens / final["train_runtime"],
                "peak_rss_mb_per_worker": {r: m["host_peak_rss_mb"] for r, m in res.peak_memory.items()},
            }
    base = results["workers1_zero2"]["tokens_per_s"]
    summary = {"model": args.model, "steps": args.steps, "results": results,
               "speedup_2_vs_1_workers_zero2": results["workers2_zero2"]["tokens_per_s"] / base,
               "zero3_vs_zero2_2_workers": results["workers2_zero3"]["tokens_per_s"] / results["workers2_zero2"]["tokens_per_s"]}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    cells = [f"{k}={v['tokens_per_s']:.0f} tok/s ({max(v['peak_rss_mb_per_worker'].values()):.0f} MiB/worker)" for k, v in results.items()]
    print(f"teacher SFT ({args.model}, {args.steps} steps): " + ", ".join(cells)
          + f"; 2 vs 1 workers {summary['speedup_2_vs_1_workers_zero2']:.2f}x, ZeRO-3 vs ZeRO-2 {summary['zero3_vs_zero2_2_workers']:.2f}x -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
