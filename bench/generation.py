"""Benchmark: tokens/s of the MPCoT generation stage vs raw `vllm.LLM.generate` vs a transformers `generate` loop,
on the same prompts (bundled ESCI pairs x the three perspectives), greedy, free-text output.

Each path runs in its own subprocess, timed end to end (library import, model load / engine start included; for the
stage also the Ray Data actor start), and the generate-only time is reported too. `--dtypes` runs each path once per
dtype (`auto` = what the pipeline picks: hardware/cpu.py on CPU). Writes JSON and prints one summary line with the
CPU, its flags and the load average.

    .venv/bin/python bench/generation.py [--model smollm2-135m-instruct] [--prompts 256] [--max-tokens 64]
    .venv/bin/python bench/generation.py --paths vllm,hf --dtypes float32,bfloat16,float16 --prompts 64
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_tasks(n: int):
    from mpcot.tasks import expand_tasks
    from mpcot.labels import DEFAULT_ESCI_LABELS, Label
    from mpcot.perspectives import DEFAULT_PERSPECTIVES, Perspective
    from pairs.config import ColumnMap
    from pairs.scan import load_pairs

    labels = [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
    perspectives = [Perspective(**p) for p in DEFAULT_PERSPECTIVES]
    pairs = load_pairs(ROOT / "data" / "esci_us_subset.jsonl", "auto", ColumnMap(), [lab.name for lab in labels])
    tasks = expand_tasks(pairs.slice(0, (n + 2) // 3), perspectives, 1, "train").slice(0, n)
    return tasks, labels, perspectives


def gen_config(args):
    from mpcot.config import GenerationConfig

    return GenerationConfig(output_mode="free_text", temperature=0.0, max_tokens=args.max_tokens, batch_size=args.batch_size)


def prompts_for(tasks, labels, perspectives, gen, tokenizer):
    from mpcot.prompts import build_messages, render_prompt

    by_name = {p.name: p for p in perspectives}
    return [
        render_prompt(tokenizer, build_messages({"query": t["query"], "title": t["title"], "attributes": json.loads(t["attributes"])},
                                                by_name[t["perspective"]], labels, gen.output_mode))
        for t in tasks.to_pylist()
    ]


def run_path(path: str, args) -> dict:
    from workflows.models import resolve_model

    model = resolve_model(args.model)
    tasks, labels, perspectives = build_tasks(args.prompts)
    gen = gen_config(args)
    engine_dtype = {} if args.dtype == "auto" else {"dtype": args.dtype}
    if path == "stage":
        import ray

        from mpcot.generate import run_generation
        from mpcot.judge import JudgeSpec
        from hardware.runtime import ensure_ray

        ensure_ray()
        spec = JudgeSpec(model, args.model, [lab.model_dump() for lab in labels], [p.model_dump() for p in perspectives],
                         gen.model_dump(), engine_dtype)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            res = run_generation(tasks, out, spec, gen, progress=False)
            total = time.time() - t0
        ray.shutdown()
        return {"tokens": res.completion_tokens_now, "seconds_total": total, "rows": res.rows}
    if path == "vllm":
        from mpcot.placement import engine_placement

        place = engine_placement(gen.accelerator, os.cpu_count(), _gpus(), 1, None, 1)
        os.environ.update(place.env)
        t0 = time.time()  # like the stage's actor, this path pays for importing vLLM
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, seed=0, **{**place.engine_defaults, **engine_dtype})
        prompts = prompts_for(tasks, labels, perspectives, gen, llm.get_tokenizer())
        t1 = time.time()
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=gen.max_tokens), use_tqdm=False)
        t2 = time.time()
        return {"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds_total": t2 - t0, "seconds_generate": t2 - t1}
    if path == "hf":
        t0 = time.time()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        tok = AutoTokenizer.from_pretrained(model, padding_side="left")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, _hf_dtype(args.dtype, device))).to(device).eval()
        prompts = prompts_for(tasks, labels, perspectives, gen, tok)
        t1 = time.time()
        tokens = 0
        with torch.inference_mode():
            for i in range(0, len(prompts), args.hf_batch_size):
                enc = tok(prompts[i : i + args.hf_batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = lm.generate(**enc, max_new_tokens=gen.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                tokens += int(sum(_length(row, tok.eos_token_id, tok.pad_token_id) for row in new.tolist()))
        t2 = time.time()
        return {"tokens": tokens, "seconds_total": t2 - t0, "seconds_generate": t2 - t1}
    raise ValueError(path)


def _hf_dtype(dtype: str, device: str) -> str:
    """`auto`: bf16 on GPU, torch's dtype for this CPU (hardware/cpu.py) on CPU."""
    if dtype != "auto":
        return dtype
    from hardware.cpu import cpu_info

    return "bfloat16" if device == "cuda" else cpu_info().torch_dtype


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _length(row: list[int], eos: int, pad: int) -> int:
    """Generated tokens up to and including the first EOS (what vLLM counts)."""
    for i, t in enumerate(row):
        if t == eos:
            return i + 1
    return len([t for t in row if t != pad])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="stage: prompts per vLLM call")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--paths", default="vllm,stage,hf")
    p.add_argument("--dtypes", default="auto", help="comma list of auto, float32, bfloat16, float16")
    p.add_argument("--rounds", type=int, default=1, help="repeat every setting; the best round counts")
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "generation.json"))
    p.add_argument("--_path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._path:
        print("RESULT " + json.dumps(run_path(args._path, args)), flush=True)
        return 0
    from hardware.cpu import machine

    dtypes, paths = args.dtypes.split(","), args.paths.split(",")
    results = {}
    # rounds interleave the settings (path x dtype, then again) so drift on a shared machine hits all alike
    for _, path, dtype in itertools.product(range(args.rounds), paths, dtypes):
        cmd = [sys.executable, __file__, "--_path", path, "--model", args.model, "--prompts", str(args.prompts),
               "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size),
               "--hf-batch-size", str(args.hf_batch_size), "--dtype", dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"benchmark path {path!r} ({dtype}) failed (exit {proc.returncode})")
        r = json.loads(line[-1][7:]) | {"dtype": dtype}
        r["tokens_per_s_total"] = r["tokens"] / r["seconds_total"]
        if "seconds_generate" in r:
            r["tokens_per_s_generate"] = r["tokens"] / r["seconds_generate"]
        key = path if len(dtypes) == 1 else f"{path}@{dtype}"
        if key not in results or r["tokens_per_s_total"] > results[key]["tokens_per_s_total"]:
            results[key] = r  # the least disturbed round
    summary = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
               **machine(), **results}
    if "stage" in results and "vllm" in results:
        summary["stage_vs_raw_vllm"] = results["stage"]["tokens_per_s_total"] / results["vllm"]["tokens_per_s_total"]
    if "hf" in results and "vllm" in results:
        summary["raw_vllm_vs_transformers"] = results["vllm"]["tokens_per_s_total"] / results["hf"]["tokens_per_s_total"]
    for path in paths:  # dtype vs fp32 on the same path, generate-only where the path reports it
        base = results.get(f"{path}@float32")
        for dtype in dtypes:
            if base and dtype != "float32" and f"{path}@{dtype}" in results:
                rate = "tokens_per_s_generate" if "tokens_per_s_generate" in base else "tokens_per_s_total"
                summary[f"{path}_{dtype}_vs_float32"] = results[f"{path}@{dtype}"][rate] / base[rate]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    parts = [f"{k}={v['tokens_per_s_total']:.0f} tok/s" + (f" ({v['tokens_per_s_generate']:.0f} generating)" if "tokens_per_s_generate" in v else "")
             for k, v in results.items()]
    ratios = [f"{k}={v:.2f}x" for k, v in summary.items() if k.endswith(("_vs_raw_vllm", "_vs_transformers", "_vs_float32"))]
    print(f"generation ({args.model}, {args.prompts} prompts x {args.max_tokens} tok): " + ", ".join(parts + ratios)
          + f"; {summary['cpu']}; load {summary['load_average']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
