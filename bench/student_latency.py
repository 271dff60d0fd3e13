"""Benchmark: per-pair latency of the student — vanilla cross-encoder vs each latent reasoning extractor, same
backbone, same run — at batch 1/16/64; the serving paths (torch fp32, torch bf16 where the CPU has native bf16,
ONNX fp32, ONNX int8) for a trained student and a vanilla student on the same backbone, items/s at batch 1/16/64 and
test macro-F1 of each path on the same split; and the three-perspective teacher's per-pair generation latency.
No Ray, so it runs on a bare GPU machine too (`--device cuda`: the torch paths only).

    .venv/bin/python bench/student_latency.py [--student STUDENT_OR_RUN_DIR] [--device cpu|cuda] [--no-teacher]

--student defaults to the best student of runs/local (its test split scores the paths); without one a random
student on the backbone is timed and its macro-F1 means nothing. Settings are timed in interleaved rounds so that
drift on a shared machine hits them alike; the line printed names the CPU, its flags and the load average.
Teacher latency uses transformers `generate` (greedy, --teacher-tokens new tokens per perspective), the engine a bare
machine has; vLLM batches better at large batch sizes, so the batch-16 ratio is an upper bound for vLLM serving.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# idle OpenMP threads sleep rather than spin, as in a Serve replica (serve/app.py): on a shared machine spinning
# threads slow torch several-fold and would make the comparison about the load, not the paths
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

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


PATHS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
PARITY_ROW = {("torch", "fp32"): "torch", ("torch", "bf16"): "torch-bf16", ("onnxruntime", "fp32"): "model.onnx",
              ("onnxruntime", "int8"): "model.int8.onnx"}


def serving_paths(student: Path, test: tuple[list, list] | None, pairs: list[dict], batch_sizes, device: str,
                  repeats: int, workdir: Path) -> dict:
    """Items/s of every serving path this machine offers, for `student` and for a vanilla student (no extractor,
    random weights: timing only) of the same backbone and length, all timed in the same interleaved rounds; and
    each path's macro-F1 and label agreement with torch fp32 on `test` ((query, product text) pairs, gold labels)."""
    from transformers import AutoTokenizer

    from hardware.cpu import cpu_info
    from serve.scorer import StudentScorer
    from student.export import export_onnx

    lrkd, vanilla = workdir / "lrkd", workdir / "vanilla"
    shutil.copytree(student, lrkd, ignore=shutil.ignore_patterns("*.onnx", "onnx_export.json"))  # the run stays as it is
    tok = AutoTokenizer.from_pretrained(lrkd)
    torch.manual_seed(0)
    cfg = json.loads((lrkd / "student_config.json").read_text())
    LRKDStudent(StudentConfig(**{**cfg, "extractor": "none"})).save_pretrained(vanilla, tokenizer=tok)
    paths = [p for p in PATHS if device == "cpu" or p[0] == "torch"]
    paths = [p for p in paths if p != ("torch", "bf16") or device == "cuda" or cpu_info().native_bf16]
    parity = {}
    if device == "cpu":
        parity = export_onnx(lrkd, quantize=True, check_pairs=test[0] if test else None, check_labels=test[1] if test else None)["parity"]
        export_onnx(vanilla, quantize=True)
    scorers = {(b, prec, name): StudentScorer(str(folder), device, b, prec)
               for b, prec in paths for name, folder in (("lrkd", lrkd), ("vanilla", vanilla))}
    out = {f"{b}-{prec}": {"lrkd": {}, "vanilla": {}} for b, prec in paths}
    for size in batch_sizes:
        batch = pairs[:size]
        enc = encode_pairs(tok, [p["query"] for p in batch], [product_text(p["product_title"], "{}") for p in batch], cfg["max_length"])
        times = {k: [] for k in scorers}
        for sc in scorers.values():
            sc.forward(enc)  # warm-up: first-run allocations and graph preparation
        for _ in range(repeats):
            for k, sc in scorers.items():
                t = time.perf_counter()
                sc.forward(enc)
                times[k].append(time.perf_counter() - t)
        for (b, prec, name), ts in times.items():
            out[f"{b}-{prec}"][name][f"batch{size}_items_per_s"] = size / statistics.median(ts)
    for b, prec in paths:
        row = parity.get(PARITY_ROW[b, prec], {})
        f1 = parity.get("macro_f1", {}).get(PARITY_ROW[b, prec])
        out[f"{b}-{prec}"] |= {"macro_f1": f1, "label_agreement": 1.0 if (b, prec) == ("torch", "fp32") else row.get("label_agreement")}
    return {"test_pairs": parity.get("pairs"), "paths": out}


def _student_and_test(target: str | None, backbone: str) -> tuple[Path, tuple[list, list] | None]:
    """The student to time (given, else the best of runs/local, else a random poly student) and its run's test split,
    else the local config's test split of the bundled data (None for the random student)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from serve.launch import find_student, run_split
    from student.export import check_set

    if target is None and (ROOT / "runs" / "local" / "student" / "metrics.json").exists():
        target = str(ROOT / "runs" / "local")
    if target is None:
        folder = Path(tempfile.mkdtemp(prefix="random-student-"))
        cfg = StudentConfig(labels=["E", "S", "C", "I"], perspectives=[p["name"] for p in DEFAULT_PERSPECTIVES], extractor="poly")
        torch.manual_seed(0)
        LRKDStudent.from_encoder(backbone, cfg).save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(backbone))
        return folder, None
    student = find_student(target)
    split = run_split(student, "test")
    if split is not None:
        return student, check_set(pq.read_table(split))
    from workflows.config import load_config
    from pairs.scan import load_pairs as load_labelled
    from pairs.splits import split_by_query

    cfg = load_config(ROOT / "configs" / "local.yaml")
    table = load_labelled(ROOT / cfg.data.path, cfg.data.format, cfg.data.columns, [lab.name for lab in cfg.labels])
    return student, check_set(split_by_query(table, cfg.data.split)["test"])


def _paths_line(served: dict, size: int) -> str:
    """Items/s per path at batch `size`, speed-up over torch fp32, macro-F1 loss, LRKD / vanilla time; the fastest
    path within 0.5 macro-F1 points of torch fp32."""
    paths = served["paths"]
    base = paths["torch-fp32"]
    key = f"batch{size}_items_per_s"
    cells, ok = [], []
    for name, r in paths.items():
        speed = r["lrkd"][key] / base["lrkd"][key]
        overhead = r["vanilla"][key] / r["lrkd"][key]
        loss = None if r["macro_f1"] is None or base["macro_f1"] is None else 100 * (base["macro_f1"] - r["macro_f1"])
        cells.append(f"{name} {r['lrkd'][key]:.0f} items/s ({speed:.2f}x, lrkd/vanilla {overhead:.2f}x"
                     + (f", F1 {r['macro_f1']:.3f}, agree {r['label_agreement']:.1%}" if loss is not None else "") + ")")
        if loss is not None and loss <= 0.5:
            ok.append((speed, name))
    best = f"fastest within 0.5 F1 points: {max(ok)[1]} {max(ok)[0]:.2f}x torch fp32" if ok else "no labelled split"
    return f"serving paths at batch {size}: " + ", ".join(cells) + f"; {best} (test pairs: {served['test_pairs']})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backbone", default=None, help="student encoder folder (default: all-MiniLM-L6-v2 from its package)")
    p.add_argument("--teacher", default=None, help="teacher LLM folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--teacher-tokens", type=int, default=64, help="new tokens per perspective rationale")
    p.add_argument("--teacher-batches", default="1,16")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--student", default=None, help="a trained student folder or run dir (default: runs/local if trained)")
    p.add_argument("--no-teacher", action="store_true", help="skip the (slow) teacher latency")
    p.add_argument("--no-extractors", action="store_true", help="skip the extractor overhead on random students")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "student_latency.json"))
    args = p.parse_args()
    if args.backbone is None or args.teacher is None:
        from workflows.models import MINILM, SMOLLM2, resolve_model  # no Ray: plain file lookups / one-time conversion

        args.backbone = args.backbone or resolve_model(MINILM)
        args.teacher = args.teacher or resolve_model(SMOLLM2)
    batches = [int(x) for x in args.batches.split(",")]
    pairs = load_pairs(max(batches))
    from hardware.cpu import machine

    summary = {"device": args.device, "threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
               "backbone": args.backbone, **machine()}
    parts = []
    if not args.no_extractors:
        students = student_latencies(args.backbone, ["none", "mlp", "poly", "gat"], pairs, batches, args.device, args.repeats)
        van = students["none"]
        summary |= {"students": students, "overhead_vs_vanilla_batch16": {
            k: v["batch16_ms_per_pair"] / van["batch16_ms_per_pair"] for k, v in students.items() if k != "none"}}
        over = ", ".join(f"{k} {v:.2f}x" for k, v in summary["overhead_vs_vanilla_batch16"].items())
        parts.append(f"vanilla {van['batch1_ms_per_pair']:.1f}/{van['batch16_ms_per_pair']:.2f}/{van['batch64_ms_per_pair']:.2f} "
                     f"ms/pair at batch 1/16/64; extractor overhead at batch 16: {over}")
    student, test = _student_and_test(args.student, args.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        served = serving_paths(student, test, pairs, batches, args.device, args.repeats, Path(tmp))
    summary |= {"student": str(student), "serving": served}
    parts.append(_paths_line(served, 16))
    if not args.no_teacher:
        teacher = teacher_latency(args.teacher, pairs, [int(x) for x in args.teacher_batches.split(",")], args.device, args.teacher_tokens)
        poly = summary.get("students", {}).get("poly")
        summary |= {"teacher": args.teacher, "teacher_new_tokens_per_perspective": args.teacher_tokens, "teacher_3_perspectives": teacher}
        if poly:
            summary |= {"teacher_vs_student_batch16": teacher["batch16_ms_per_pair"] / poly["batch16_ms_per_pair"],
                        "teacher_vs_student_batch1": teacher["batch1_ms_per_pair"] / poly["batch1_ms_per_pair"]}
            parts.append(f"teacher (3 perspectives x {args.teacher_tokens} tok) / poly student: "
                         f"{summary['teacher_vs_student_batch16']:.0f}x at batch 16, {summary['teacher_vs_student_batch1']:.0f}x at batch 1")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"student latency ({args.device}): " + "; ".join(parts) + f"; {summary['cpu']}; load {summary['load_average']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
