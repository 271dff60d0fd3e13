"""Benchmark: per-pair latency of the student — vanilla cross-encoder vs each latent reasoning extractor, same
backbone, same run — at batch 1/16/64, and the three-perspective teacher's per-pair generation latency for the same
pairs. Imports only torch and transformers (no Ray), so it runs on a bare GPU machine too (`--device cuda`).

    .venv/bin/python bench/student_latency.py [--device cpu|cuda] [--backbone DIR] [--teacher DIR]

Teacher latency uses transformers `generate` (greedy, --teacher-tokens new tokens per perspective), the engine a bare
machine has; vLLM batches better at large batch sizes, so the batch-16 ratio is an upper bound for vLLM serving.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpcot.labels import DEFAULT_ESCI_LABELS, Label  # noqa: E402
from mpcot.perspectives import DEFAULT_PERSPECTIVES, Perspective  # noqa: E402
from mpcot.prompts import build_messages, render_prompt  # noqa: E402
from student.data import encode_pairs, product_text  # noqa: E402
from student.model import LRKDStudent, StudentConfig  # noqa: E402


def load_pairs(n: int) -> list[dict]:
    lines = (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[:n]
    return [json.loads(x) for x in lines]


def time_call(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def student_latencies(backbone: str, extractors: list[str], pairs: list[dict], batch_sizes, device: str, repeats: int) -> dict:
    """Per-pair latency of each variant; variants are timed in interleaved rounds so drift hits all of them alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    models = {}
    for name in extractors:
        torch.manual_seed(0)
        cfg = StudentConfig(labels=["E", "S", "C", "I"], perspectives=[p["name"] for p in DEFAULT_PERSPECTIVES],
                            extractor=name, mode="unified")
        models[name] = LRKDStudent.from_encoder(backbone, cfg).to(device).eval()
    out = {name: {"extractor_params": m.extractor_parameters()} for name, m in models.items()}
    for b in batch_sizes:
        batch = pairs[:b]
        enc = encode_pairs(tok, [p["query"] for p in batch], [product_text(p["product_title"], "{}") for p in batch], 128).to(device)
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                def run(model=model):
                    with torch.inference_mode():
                        model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))

                times[name].append(time_call(run, 1, device))
        for name in models:
            out[name][f"batch{b}_ms_per_pair"] = 1000 * statistics.median(times[name]) / b
    return out


def teacher_latency(teacher: str, pairs: list[dict], batch_sizes, device: str, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).to(device).eval()
    labels = [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
    persp = [Perspective(**p) for p in DEFAULT_PERSPECTIVES]
    out = {}
    for b in batch_sizes:
        prompts = [render_prompt(tok, build_messages({"query": p["query"], "title": p["product_title"], "attributes": {}}, v, labels))
                   for p in pairs[:b] for v in persp]

        def run():
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode():
                lm.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tok.pad_token_id)

        out[f"batch{b}_ms_per_pair"] = 1000 * time_call(run, 1, device) / b
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backbone", default=None, help="student encoder folder (default: all-MiniLM-L6-v2 from its package)")
    p.add_argument("--teacher", default=None, help="teacher LLM folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--teacher-tokens", type=int, default=64, help="new tokens per perspective rationale")
    p.add_argument("--teacher-batches", default="1,16")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "student_latency.json"))
    args = p.parse_args()
    if args.backbone is None or args.teacher is None:
        from workflows.models import MINILM, SMOLLM2, resolve_model  # no Ray: plain file lookups / one-time conversion

        args.backbone = args.backbone or resolve_model(MINILM)
        args.teacher = args.teacher or resolve_model(SMOLLM2)
    batches = [int(x) for x in args.batches.split(",")]
    pairs = load_pairs(max(batches))
    students = student_latencies(args.backbone, ["none", "mlp", "poly", "gat"], pairs, batches, args.device, args.repeats)
    teacher = teacher_latency(args.teacher, pairs, [int(x) for x in args.teacher_batches.split(",")], args.device, args.teacher_tokens)
    van = students["none"]
    summary = {
        "device": args.device, "threads": torch.get_num_threads(), "backbone": args.backbone, "teacher": args.teacher,
        "teacher_new_tokens_per_perspective": args.teacher_tokens, "students": students, "teacher_3_perspectives": teacher,
        "overhead_vs_vanilla_batch16": {k: v["batch16_ms_per_pair"] / van["batch16_ms_per_pair"] for k, v in students.items() if k != "none"},
        "teacher_vs_student_batch16": teacher["batch16_ms_per_pair"] / students["poly"]["batch16_ms_per_pair"],
        "teacher_vs_student_batch1": teacher["batch1_ms_per_pair"] / students["poly"]["batch1_ms_per_pair"],
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    over = ", ".join(f"{k} {v:.2f}x" for k, v in summary["overhead_vs_vanilla_batch16"].items())
    print(f"student latency ({args.device}): vanilla {van['batch1_ms_per_pair']:.1f}/{van['batch16_ms_per_pair']:.2f}/"
          f"{van['batch64_ms_per_pair']:.2f} ms/pair at batch 1/16/64; extractor overhead at batch 16: {over}; "
          f"teacher (3 perspectives x {args.teacher_tokens} tok) / poly student: {summary['teacher_vs_student_batch16']:.0f}x at batch 16, "
          f"{summary['teacher_vs_student_batch1']:.0f}x at batch 1 -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
