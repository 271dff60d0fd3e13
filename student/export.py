"""Export a trained student to ONNX, fp32 and int8, so that any serving stack can run it without this code.

Files written into the student folder:
  model.onnx        fp32 graph: encoder -> latent reasoning extractor -> classifier (torch.onnx dynamo exporter)
  model.int8.onnx   the same graph in int8 (ONNX Runtime dynamic quantization): the weights of every MatMul with a
                    constant weight and of every Gemm per channel, the embedding tables per tensor, activations per
                    tensor for each batch
  onnx_export.json  input/output names, opset, versions, the digest of the weights it came from, parity checks
                    (each file, and torch bf16 where the CPU has native bf16, against torch fp32)

Graph interface (see docs/serving.md, "Export for other serving stacks"): inputs `input_ids`, `attention_mask` and,
where the backbone's tokenizer produces them, `token_type_ids` — int64, shape [batch, sequence], both axes dynamic,
from the student's own tokenizer on `[CLS] query [SEP] product text [SEP]`. Outputs, float32: `logits` [batch,
labels] in the order of `student_config.json` `labels`, and `perspective_scores` [batch, perspectives] (cosine of
the latent to each perspective's centroid; only for students with an extractor).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

FP32, INT8, REPORT = "model.onnx", "model.int8.onnx", "onnx_export.json"
OUTPUTS = ("logits", "perspective_scores")
FP32_MAX_DIFF = 1e-4  # the fp32 graph must reproduce torch's logits this closely
# int8 and bf16 are trusted (and served by default) when they agree with fp32 this often and lose at most this
# much macro-F1
REDUCED_MIN_AGREEMENT, REDUCED_MAX_F1_LOSS = 0.99, 0.005
TORCH_BF16 = "torch-bf16"  # the parity row of torch in bf16


class ExportWrapper(nn.Module):
    """The student's public interface as a graph: token tensors -> (logits, perspective_scores)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.model(input_ids, attention_mask, token_type_ids)
        if out.get("z") is None:  # vanilla cross-encoder: no latent, no perspectives
            return (out["logits"],)
        return out["logits"], self.model.perspective_scores(out)


def weights_digest(student_dir: str | Path) -> str:
    """sha256 of the student's config and weights: an export made from other weights is stale."""
    h = hashlib.sha256()
    for name in ("student_config.json", "model.safetensors"):
        with open(Path(student_dir) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def export_status(student_dir: str | Path) -> dict | None:
    """The folder's onnx_export.json if it matches the current weights and its files exist, else None."""
    path = Path(student_dir) / REPORT
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    files_ok = all((Path(student_dir) / f).exists() for f in report["files"])
    return report if files_ok and report["weights_sha256"] == weights_digest(student_dir) else None


def input_names(tokenizer) -> list[str]:
    """The graph's inputs, in order: token_type_ids only where the tokenizer produces them."""
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]


def load_session(path: str | Path, threads: int):
    """An ONNX Runtime CPU session with every graph optimisation, `threads` intra-op threads, no thread spinning
    (spinning threads steal the cores that tokenisation and the other requests need)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(student_dir: str | Path, quantize: bool = True, check_pairs: list[tuple[str, str]] | None = None,
                check_labels: list[str] | None = None) -> dict:
    """Write model.onnx (and model.int8.onnx) and onnx_export.json into `student_dir`; return the report.

    check_pairs: real (query, product text) pairs to compare the graphs with torch on, e.g. a run's validation
    split; check_labels: their gold label names, for macro-F1. Without them a few built-in pairs check the fp32
    graph only, and int8/bf16 are not judged.
    """
    import onnx
    import onnxruntime
    from transformers import AutoTokenizer

    from student.model import LRKDStudent

    student_dir = Path(student_dir)
    model = LRKDStudent.from_pretrained(student_dir).float().eval()
    tok = AutoTokenizer.from_pretrained(student_dir)
    names = input_names(tok)
    wrapper = ExportWrapper(model).eval()
    # two pairs of different lengths: a batch or length of 1 would be baked into the graph as a constant
    example = tok(["usb c cable", "110cfm bathroom exhaust fan without light"],
                  ["Anker USB-C to USB-C cable 2 m", "Panasonic WhisperCeiling fan"], padding=True, return_tensors="pt")
    args = tuple(example[n] for n in names)
    with torch.inference_mode():
        n_out = len(wrapper(*args))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    tmp = student_dir / f".{FP32}.tmp"
    with warnings.catch_warnings():  # "axis name ... will not be used": every input shares the two named axes
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names, output_names=list(OUTPUTS[:n_out]),
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in names}, external_data=False,
                                    verbose=False)
    program.save(str(tmp))
    os.replace(tmp, student_dir / FP32)
    files = [FP32]
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = student_dir / f".{INT8}.tmp"
        # the fastest int8 recipe we measured; no other we tried (static QDQ, reduce_range, sensitive layers in fp32,
        # per-token activations, 8-bit MatMulNBits) passed parity on the local students' validation splits while
        # running faster than torch bf16 (docs/results.md, "int8 recipes tried"), so parity decides whether this file
        # is served
        quantize_dynamic(student_dir / FP32, tmp, weight_type=QuantType.QInt8, per_channel=True)
        os.replace(tmp, student_dir / INT8)
        files.append(INT8)
    else:
        (student_dir / INT8).unlink(missing_ok=True)  # an int8 graph of other weights must not outlive them
    report = {
        "files": files, "inputs": names, "outputs": list(OUTPUTS[:n_out]), "labels": model.cfg.labels,
        "perspectives": model.cfg.perspectives if n_out == 2 else [], "max_length": model.cfg.max_length,
        "opset": next(o.version for o in onnx.load(str(student_dir / FP32), load_external_data=False).opset_import if o.domain == ""),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "weights_sha256": weights_digest(student_dir),
        "parity": parity(model, tok, student_dir, files, check_pairs or _PROBES, check_labels),
    }
    tmp = student_dir / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, student_dir / REPORT)
    return report


# used when no real pairs are given: enough to catch a broken graph, not to judge int8
_PROBES = [("usb c cable", "Anker USB-C to USB-C cable 2 m | color: black"),
           ("110cfm bathroom exhaust fan without light", "Panasonic FV-0511VQ1 WhisperCeiling DC Ventilation Fan"),
           ("garden hose", "Replacement grille for bathroom fan | material: plastic"),
           ("running shoes men size 10", "Nike Air Zoom Pegasus women's running shoe, size 8 " * 6)]


def parity(model, tok, student_dir: Path, files: list[str], pairs: list[tuple[str, str]], gold: list[str] | None,
           batchings: tuple[int, ...] = (1, 32)) -> dict:
    """Torch fp32 vs each ONNX file, and vs torch bf16 where this CPU has native bf16, on `pairs`: max |difference|
    of every output, label agreement, and macro-F1 against `gold` when given — each the worst over `batchings`
    (pairs scored one by one and in batches: int8 scales its activations per batch, so its labels depend on the
    batch a pair shares).

    model.onnx `passes` when its logits are within FP32_MAX_DIFF of torch. The reduced-precision paths (int8,
    bf16) pass when their label agreement and macro-F1 loss, which need gold labels, are within
    REDUCED_MIN_AGREEMENT and REDUCED_MAX_F1_LOSS: only then does `precision: auto` serve them.
    """
    from sklearn.metrics import f1_score

    from hardware.cpu import cpu_info, threads
    from student.data import encode_pairs

    names = input_names(tok)
    runs = {"torch": ExportWrapper(model).eval()}
    runs |= {f: load_session(student_dir / f, threads()) for f in files}
    if cpu_info().native_bf16:
        runs[TORCH_BF16] = ExportWrapper(copy.deepcopy(model).to(torch.bfloat16)).eval()
    labels = model.cfg.labels
    y = np.array([labels.index(g) for g in gold]) if gold is not None else None
    rows = {k: {"max_abs_diff": dict.fromkeys(OUTPUTS, 0.0), "label_agreement": 1.0} for k in runs if k != "torch"}
    f1, ref = {}, None
    # the largest batching first: torch fp32 and the fp32 graph run there only (their outputs do not depend on the
    # batch), the reduced precisions at every batching, all against that torch reference
    for size in sorted(batchings, reverse=True):
        active = {k: v for k, v in runs.items() if ref is None or k not in ("torch", FP32)}
        outs = {k: [] for k in active}
        for i in range(0, len(pairs), size):
            chunk = pairs[i : i + size]
            enc = encode_pairs(tok, [q for q, _ in chunk], [p for _, p in chunk], model.cfg.max_length)
            for k, run in active.items():
                if isinstance(run, nn.Module):
                    with torch.inference_mode():
                        outs[k].append([t.float().numpy() for t in run(*(enc[n] for n in names))])
                else:
                    outs[k].append(run.run(None, {n: enc[n].numpy() for n in names}))
        cat = {k: [np.concatenate([b[j] for b in v]) for j in range(len(v[0]))] for k, v in outs.items()}
        ref = cat.get("torch", ref)
        pred = {k: v[0].argmax(-1) for k, v in cat.items()} | {"torch": ref[0].argmax(-1)}
        for k, r in rows.items():
            if k not in cat:
                continue
            for name, a, b in zip(OUTPUTS, ref, cat[k]):
                r["max_abs_diff"][name] = max(r["max_abs_diff"][name], float(np.abs(a - b).max()))
            r["label_agreement"] = min(r["label_agreement"], float((pred[k] == pred["torch"]).mean()))
        if y is not None:
            for k, p in pred.items():
                score = float(f1_score(y, p, labels=list(range(len(labels))), average="macro", zero_division=0))
                f1[k] = min(f1.get(k, score), score)
    result = {"pairs": len(pairs), "batchings": list(batchings), "gold_labels": gold is not None}
    if y is not None:
        result["macro_f1"] = f1
    for k, r in rows.items():
        r["max_abs_diff"] = {n: v for n, v in r["max_abs_diff"].items() if n in OUTPUTS[: len(ref)]}
        if k == FP32:
            r["passes"] = r["max_abs_diff"]["logits"] <= FP32_MAX_DIFF
        elif y is None:
            r["passes"], r["why"] = False, "not judged: no labelled pairs were given"
        else:
            loss = f1["torch"] - f1[k]
            r["passes"] = r["label_agreement"] >= REDUCED_MIN_AGREEMENT and loss <= REDUCED_MAX_F1_LOSS
            r["why"] = (f"label agreement {r['label_agreement']:.3f} (needs >= {REDUCED_MIN_AGREEMENT}), macro-F1 loss "
                        f"{loss:+.4f} (needs <= {REDUCED_MAX_F1_LOSS}) on {len(pairs)} labelled pairs, worst of "
                        f"batch sizes {', '.join(map(str, batchings))}")
        result[k] = r
    return result


def check_set(table) -> tuple[list[tuple[str, str]], list[str]]:
    """A prepared split (Arrow table with query, title, attributes, label) -> (query, product text) pairs, labels."""
    from student.data import product_text

    rows = table.select(["query", "title", "attributes", "label"]).to_pylist()
    return [(r["query"], product_text(r["title"], r["attributes"])) for r in rows], [r["label"] for r in rows]


def summarize(report: dict) -> str:
    """One line per exported file: how it compares with torch fp32 and whether it passes."""
    par = report["parity"]
    lines = []
    for f in [k for k in (FP32, INT8, TORCH_BF16) if k in par]:
        r = par[f]
        line = f"{f}: max |logit diff| {r['max_abs_diff']['logits']:.1e}, label agreement {r['label_agreement']:.1%}"
        if par["gold_labels"]:
            line += f", macro-F1 {par['macro_f1'][f]:.4f} (torch fp32 {par['macro_f1']['torch']:.4f})"
        lines.append(f"{line} on {par['pairs']} pairs (worst of batch sizes {par['batchings']}) -> {'passes' if r['passes'] else 'FAILS'}"
                     + (f" ({r['why']})" if not r["passes"] and "why" in r else ""))
    return "\n".join(lines)
