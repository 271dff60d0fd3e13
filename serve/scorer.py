"""A loaded student that scores (query, product text) pairs on one serving path. No Ray import: the Serve replica
wraps it, and the benchmarks time exactly what a replica runs.

  backend       device  precision
  onnxruntime   cpu     fp32 (model.onnx) | int8 (model.int8.onnx)      files from `thinkbroad export`
  torch         cpu     fp32 | bf16 (only where the CPU has native bf16: hardware/cpu.py)
  torch         cuda    fp32 | bf16 | fp16

`auto` picks the fastest path that keeps the fp32 labels: on CPU the first of onnxruntime int8, torch bf16,
onnxruntime fp32 whose parity check (written by the export) passed; on a GPU torch bf16 where supported, else fp16.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hardware.cpu import PrecisionError, cpu_info, require_native_bf16, threads
from student.export import FP32, INT8, TORCH_BF16, export_status, weights_digest

# CPU paths, fastest first as measured on our development CPU, each with the parity row that must pass to use it
CPU_ORDER = (("onnxruntime", "int8", INT8), ("torch", "bf16", TORCH_BF16), ("onnxruntime", "fp32", FP32))
ALLOWED = {("onnxruntime", "cpu"): ("fp32", "int8"), ("torch", "cpu"): ("fp32", "bf16"), ("torch", "cuda"): ("fp32", "bf16", "fp16")}


def resolve_path(device: str, backend: str, precision: str, export: dict | None) -> tuple[str, str, str]:
    """The (device, backend, precision) that settings mean on this machine; PrecisionError says why one cannot run here.

    export: the student's current onnx_export.json (`export_status`), whose parity rows say which reduced-precision
    paths keep the fp32 labels. `auto` on CPU takes the fastest of those, in the order measured on our CPU
    (docs/serving.md, "Which path serves"): onnxruntime int8, torch bf16 (native bf16 only), onnxruntime fp32;
    torch fp32 when there is no export.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    passed = {k for k, v in (export or {}).get("parity", {}).items() if isinstance(v, dict) and v.get("passes")}
    if not cpu_info().native_bf16:  # the export may have been checked on another machine
        passed.discard(TORCH_BF16)
    if device == "cuda":
        backend = "torch" if backend == "auto" else backend
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif backend == "auto" and precision == "auto":
        backend, precision = next(((b, p) for b, p, row in CPU_ORDER if row in passed), ("torch", "fp32"))
    elif backend == "auto":  # bf16 is a torch precision; fp32 and int8 run on onnxruntime once exported
        backend = "onnxruntime" if precision == "int8" or (precision == "fp32" and export) else "torch"
    elif precision == "auto":
        precision = next((p for b, p, row in CPU_ORDER if b == backend and row in passed), "fp32")
    if (backend, device) not in ALLOWED:
        raise PrecisionError("serve.backend onnxruntime runs on CPU (the installed onnxruntime has no GPU provider); "
                             "on a GPU use serve.backend: torch")
    if precision not in ALLOWED[backend, device]:
        raise PrecisionError(f"serve.precision {precision} is not available with serve.backend {backend} on {device}; "
                             f"choose one of {', '.join(ALLOWED[backend, device])}")
    if (device, precision) == ("cpu", "bf16"):
        require_native_bf16("serve.precision bf16")
    if (device, precision) == ("cuda", "bf16") and not torch.cuda.is_bf16_supported():
        raise PrecisionError("serve.precision bf16: this GPU does not support bf16; use fp16")
    return device, backend, precision


def model_name(student_dir: str | Path) -> str:
    """How answers and /v1/model name a student: its folder with the folder above (a run's student is
    .../variants/<variant>/best), never the path on the server's disk; the digest tells versions apart."""
    parts = Path(student_dir).resolve().parts
    return "/".join(parts[-2:])


class StudentScorer:
    """student_dir: a student folder (for onnxruntime with a current export in it). score() returns one dict per
    pair: label, probabilities, score (expected relevance), dominant_perspective, truncated."""

    def __init__(self, student_dir: str, device: str = "auto", backend: str = "auto", precision: str = "auto"):
        from transformers import AutoTokenizer

        self.dir = Path(student_dir)
        self.name = model_name(self.dir)
        cfg = json.loads((self.dir / "student_config.json").read_text())
        self.labels, self.perspectives, self.max_length = cfg["labels"], cfg["perspectives"], cfg["max_length"]
        self.extractor, self.mode = cfg["extractor"], cfg["mode"]
        encoder = cfg["encoder_config"].get("_name_or_path") or cfg["encoder_config"].get("model_type")
        self.encoder = Path(encoder).name if encoder and Path(encoder).is_absolute() else encoder  # no server paths
        self.tok = AutoTokenizer.from_pretrained(student_dir)
        if not self.tok.is_fast:  # the Rust tokenizer reports truncation from the one tokenisation we do
            raise ValueError(f"{student_dir}: serving needs a fast tokenizer (tokenizer.json)")
        export = export_status(self.dir)
        self.digest = export["weights_sha256"] if export else weights_digest(self.dir)  # what /v1/model names
        self.device, self.backend, self.precision = resolve_path(device, backend, precision, export)
        if self.backend == "onnxruntime":
            self._load_onnx(export)
        else:
            self._load_torch()
        n = len(self.labels)
        # ordered label set, best first: E=1, S=2/3, C=1/3, I=0 for ESCI
        self.grades = np.array([1 - i / (n - 1) for i in range(n)], dtype=np.float32)

    def _load_onnx(self, export: dict | None) -> None:
        file = INT8 if self.precision == "int8" else FP32
        if export is None or file not in export["files"]:
            raise FileNotFoundError(f"{self.dir} has no current {file} (missing, or exported from other weights): run "
                                    f"`thinkbroad export {self.dir} --format onnx --quantize int8`, or set serve.backend: torch")
        from student.export import load_session

        self.file = file
        self.inputs = export["inputs"]
        self.session = load_session(self.dir / file, threads())

    def _load_torch(self) -> None:
        import torch

        from student.export import ExportWrapper
        from student.model import LRKDStudent

        model = LRKDStudent.from_pretrained(self.dir, device=self.device)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.file = "model.safetensors"
        self.inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in self.tok.model_input_names]
        self.wrapper = ExportWrapper(model.to(dtype)).eval()

    def forward(self, enc) -> list[np.ndarray]:
        """Tokenised batch -> [logits] or [logits, perspective_scores], float32 numpy."""
        if self.backend == "onnxruntime":
            return self.session.run(None, {n: enc[n].numpy() for n in self.inputs})
        import torch

        with torch.inference_mode():
            outs = self.wrapper(*(enc[n].to(self.device) for n in self.inputs))
        return [o.float().cpu().numpy() for o in outs]

    def score(self, pairs: list[tuple[str, str]], phases: dict | None = None) -> list[dict]:
        """Score (query, product text) pairs in one forward pass, tokenising each pair once. `phases`, when given,
        gets the seconds spent tokenising, in the model and building the results."""
        import time

        from student.data import encode_pairs

        t0 = time.perf_counter()
        enc = encode_pairs(self.tok, [q for q, _ in pairs], [p for _, p in pairs], self.max_length)
        t1 = time.perf_counter()
        outs = self.forward(enc)
        t2 = time.perf_counter()
        logits = outs[0] - outs[0].max(-1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        expected = probs @ self.grades
        dominant = outs[1].argmax(-1) if len(outs) > 1 else None
        results = [
            {
                "label": self.labels[int(p.argmax())],
                "probabilities": dict(zip(self.labels, map(float, p))),
                "score": float(expected[i]),
                "dominant_perspective": self.perspectives[int(dominant[i])] if dominant is not None else None,
                "truncated": bool(enc.encodings[i].overflowing),  # the tokenizer cut some of this pair's tokens
            }
            for i, p in enumerate(probs)
        ]
        if phases is not None:
            phases.update(tokenize_s=t1 - t0, model_s=t2 - t1, post_s=time.perf_counter() - t2)
        return results

    def info(self) -> dict:
        """What /v1/model reports about the loaded model and the path it runs on."""
        return {"model": self.name, "digest": self.digest, "labels": self.labels, "perspectives": self.perspectives, "extractor": self.extractor,
                "mode": self.mode, "max_length": self.max_length, "encoder": self.encoder, "device": self.device,
                "backend": self.backend, "precision": self.precision, "file": self.file}
