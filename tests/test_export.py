"""ONNX export of the student and the serving paths built on it: the fp32 graph reproduces torch on real bundled
pairs, reduced precisions (int8, bf16) are gated by a parity check on labelled pairs, and `auto` picks the path
from that check and the CPU's features. No Ray."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hardware.cpu import CpuInfo, PrecisionError, parse_cpuinfo

ROOT = Path(__file__).resolve().parent.parent
PERSPECTIVES = ["user_intent", "structured_analysis", "business_rules"]


def labelled_split(name: str, n: int | None = None):
    """(query, product text) pairs and gold labels of the local config's split of the bundled ESCI sample."""
    from student.export import check_set
    from workflows.config import load_config
    from pairs.scan import load_pairs
    from pairs.splits import split_by_query

    cfg = load_config(ROOT / "configs" / "local.yaml")
    pairs = load_pairs(ROOT / cfg.data.path, cfg.data.format, cfg.data.columns, [lab.name for lab in cfg.labels])
    table = split_by_query(pairs, cfg.data.split)[name]
    return check_set(table.slice(0, n) if n else table)


def tiny_student(folder: Path, extractor: str) -> Path:
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import TINY_BERT, resolve_model

    enc = resolve_model(TINY_BERT)
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(enc, StudentConfig(labels=["E", "S", "C", "I"], extractor=extractor, mode="unified",
                                                        perspectives=PERSPECTIVES, target_dim=8, poly_codes=6, max_length=48))
    model.centroids.copy_(torch.randn(3, 8))
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(enc))
    return folder


@pytest.mark.parametrize("extractor", ["poly", "gat", "none"])
def test_fp32_graph_reproduces_torch_on_bundled_pairs_at_any_batch_and_length(tmp_path, extractor):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from student.data import encode_pairs
    from student.export import ExportWrapper, export_onnx, export_status
    from student.model import LRKDStudent

    folder = tiny_student(tmp_path / "student", extractor)
    pairs, gold = labelled_split("test", 48)
    report = export_onnx(folder, quantize=True, check_pairs=pairs, check_labels=gold)
    outputs = ["logits", "perspective_scores"] if extractor != "none" else ["logits"]
    assert report["outputs"] == outputs and report["inputs"] == ["input_ids", "attention_mask"]  # tiny BERT: no segments
    assert report["parity"]["model.onnx"]["passes"] and report["parity"]["model.onnx"]["label_agreement"] == 1.0
    assert export_status(folder) == report

    # independently of the export's own check: other batch sizes and lengths than the example it was traced with
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == report["inputs"]
    assert [o.name for o in session.get_outputs()] == outputs
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)  # both axes dynamic
    tok = AutoTokenizer.from_pretrained(folder)
    wrapper = ExportWrapper(LRKDStudent.from_pretrained(folder))
    for chunk in (pairs[:1], pairs[1:6], pairs[6:40]):
        enc = encode_pairs(tok, [q for q, _ in chunk], [p for _, p in chunk], 48)
        with torch.inference_mode():
            want = [t.numpy() for t in wrapper(enc["input_ids"], enc["attention_mask"])]
        got = session.run(None, {n: enc[n].numpy() for n in report["inputs"]})
        for w, g in zip(want, got, strict=True):
            assert np.abs(w - g).max() <= 1e-4


def test_an_export_from_other_weights_is_stale_and_not_served(tmp_path):
    from safetensors.torch import load_file, save_file

    from serve.scorer import StudentScorer
    from student.export import export_onnx, export_status

    folder = tiny_student(tmp_path / "student", "poly")
    export_onnx(folder, quantize=False)
    assert StudentScorer(str(folder), "cpu", "onnxruntime", "fp32").backend == "onnxruntime"
    with pytest.raises(FileNotFoundError, match="model.int8.onnx"):
        StudentScorer(str(folder), "cpu", "onnxruntime", "int8")
    state = load_file(folder / "model.safetensors")
    state["classifier.bias"] += 1.0
    save_file(state, str(folder / "model.safetensors"))  # retrained in place
    assert export_status(folder) is None
    with pytest.raises(FileNotFoundError, match="thinkbroad export"):
        StudentScorer(str(folder), "cpu", "onnxruntime", "fp32")


def test_scorer_paths_agree_and_tokenise_each_request_once(tmp_path):
    from serve.scorer import StudentScorer
    from student.export import export_onnx

    folder = tiny_student(tmp_path / "student", "gat")
    export_onnx(folder, quantize=False)
    pairs = [("usb c cable", "Anker USB-C cable"), ("fan", "bathroom fan " * 40), ("hose", "garden hose 20 m")]
    results = {}
    for backend in ("torch", "onnxruntime"):
        scorer = StudentScorer(str(folder), "cpu", backend, "fp32")
        calls = []
        tok = scorer.tok
        scorer.tok = lambda *a, **k: calls.append(1) or tok(*a, **k)
        results[backend] = scorer.score(pairs)
        assert len(calls) == 1
        assert scorer.info()["backend"] == backend
    for a, b in zip(results["torch"], results["onnxruntime"]):
        assert a["label"] == b["label"] and a["dominant_perspective"] == b["dominant_perspective"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    assert [r["truncated"] for r in results["onnxruntime"]] == [False, True, False]


@pytest.mark.slow  # fine-tunes MiniLM for 24 steps: 50-110 s on 2 cores
def test_reduced_precision_is_served_only_when_it_passes_parity_on_a_fine_tuned_student(tmp_path, capsys):
    """A MiniLM student (with token_type_ids) fine-tuned briefly on the local train split, exported with int8, and
    checked on the local test split: the fp32 graph matches torch within 1e-4, the int8 and bf16 rows recompute
    from the graphs themselves, and `auto` serves the fastest path whose row passes."""
    import onnxruntime as ort
    import torch.nn.functional as F
    from sklearn.metrics import f1_score
    from transformers import AutoTokenizer

    from serve.scorer import CPU_ORDER, resolve_path
    from student.data import encode_pairs
    from student.export import INT8, export_onnx, summarize
    from student.model import LRKDStudent, StudentConfig
    from workflows.models import MINILM, resolve_model

    labels = ["E", "S", "C", "I"]
    train, train_gold = labelled_split("train")
    test, test_gold = labelled_split("test")
    enc_dir = resolve_model(MINILM)
    tok = AutoTokenizer.from_pretrained(enc_dir)
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(enc_dir, StudentConfig(labels=labels, perspectives=PERSPECTIVES, extractor="poly",
                                                            mode="unified", target_dim=384, max_length=64))
    y = torch.tensor([labels.index(g) for g in train_gold])
    weights = (len(y) / (4 * torch.bincount(y, minlength=4).clamp(min=1))).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(24):  # a short fine-tune: a trained student, not a good one
        idx = order[step * 16 : (step + 1) * 16]
        batch = encode_pairs(tok, [train[i][0] for i in idx], [train[i][1] for i in idx], 64)
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        F.cross_entropy(out["logits"], y[idx], weight=weights).backward()
        opt.step()
        opt.zero_grad()
    folder = tmp_path / "student"
    model.eval().save_pretrained(folder, tokenizer=tok)

    report = export_onnx(folder, quantize=True, check_pairs=test, check_labels=test_gold)
    par = report["parity"]
    print(summarize(report))
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert par["pairs"] == len(test) and par["model.onnx"]["max_abs_diff"]["logits"] <= 1e-4
    assert par["macro_f1"]["model.onnx"] == pytest.approx(par["macro_f1"]["torch"])

    # the int8 row, recomputed from the int8 graph itself: the worst of pairs scored alone and in batches of 32
    session = ort.InferenceSession(str(folder / INT8), providers=["CPUExecutionProvider"])
    gold = [labels.index(g) for g in test_gold]
    enc = encode_pairs(tok, [q for q, _ in test], [p for _, p in test], 64)
    with torch.inference_mode():  # fp32 labels do not depend on the batch: one reference for every batching
        ref = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])["logits"].argmax(-1).numpy()
    agreement, f1_int8 = [], []
    for size in par["batchings"]:
        got = []
        for i in range(0, len(test), size):
            enc = encode_pairs(tok, [q for q, _ in test[i : i + size]], [p for _, p in test[i : i + size]], 64)
            got += session.run(None, {n: enc[n].numpy() for n in report["inputs"]})[0].argmax(-1).tolist()
        agreement.append(float(np.mean(ref == np.array(got))))
        f1_int8.append(f1_score(gold, got, labels=range(4), average="macro", zero_division=0))
    assert par[INT8]["label_agreement"] == pytest.approx(min(agreement))
    assert par["macro_f1"][INT8] == pytest.approx(min(f1_int8))
    assert par[INT8]["passes"] == (min(agreement) >= 0.99 and par["macro_f1"]["torch"] - min(f1_int8) <= 0.005)

    passed = [(b, p) for b, p, row in CPU_ORDER if par.get(row, {}).get("passes")]
    assert resolve_path("cpu", "auto", "auto", report)[1:] == (passed[0] if passed else ("torch", "fp32"))
    assert resolve_path("cpu", "onnxruntime", "auto", report)[2] == ("int8" if par[INT8]["passes"] else "fp32")


# ---- the processor decides the CPU dtype ----

AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx f16c fma avx2\n\nprocessor\t: 1\n"
SAPPHIRE_RAPIDS = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"
ZEN5 = "model name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"


@pytest.mark.parametrize("text,native,torch_dtype,generation_dtype", [
    (AVX2_EPYC, False, "float32", "float32"), (ZEN5, True, "bfloat16", "float32"),
    (SAPPHIRE_RAPIDS, True, "bfloat16", "bfloat16"), (GRAVITON3, True, "bfloat16", "float32")])
def test_cpu_dtypes_follow_native_bf16_and_what_we_measured(text, native, torch_dtype, generation_dtype, monkeypatch):
    """torch gets bf16 with any native bf16 (teacher training too); vLLM only with AMX (AVX-512 BF16 alone generated
    slower than fp32)."""
    import hardware.cpu
    import mpcot.placement
    from mpcot.placement import engine_placement
    from teacher.config import DistributedSettings
    from teacher.placement import use_bf16

    info = parse_cpuinfo(text, cores=2)
    assert (info.native_bf16, info.torch_dtype, info.generation_dtype) == (native, torch_dtype, generation_dtype)
    assert f"torch {torch_dtype}, vLLM {generation_dtype}" in info.describe()
    monkeypatch.setattr(mpcot.placement, "cpu_info", lambda: info)
    monkeypatch.setattr(hardware.cpu, "cpu_info", lambda: info)
    assert use_bf16(DistributedSettings(), "cpu") is native
    assert use_bf16(DistributedSettings(bf16="off"), "cpu") is False
    assert engine_placement("cpu", 2, 0, 1, None, 1).engine_defaults["dtype"] == generation_dtype
    assert "dtype" not in engine_placement("gpu", 8, 8, 1, None, 1).engine_defaults  # GPUs keep the model's dtype
    if text is AVX2_EPYC:
        assert info.model == "AMD EPYC 7B12 (family 23, model 49)" and "avx2" in info.describe()


@pytest.fixture
def avx2_only(monkeypatch):
    import hardware.cpu
    import serve.scorer

    info = parse_cpuinfo(AVX2_EPYC, cores=2)
    for module in (hardware.cpu, serve.scorer):
        monkeypatch.setattr(module, "cpu_info", lambda: info)
    return info


@pytest.fixture
def bf16_cpu(monkeypatch):
    import hardware.cpu
    import serve.scorer

    info = CpuInfo("test CPU", frozenset({"avx512f", "avx512_bf16"}), 2)
    for module in (hardware.cpu, serve.scorer):
        monkeypatch.setattr(module, "cpu_info", lambda: info)
    return info


def _export(**passes) -> dict:
    return {"files": ["model.onnx", "model.int8.onnx"], "parity": {"pairs": 108, **{k: {"passes": v} for k, v in passes.items()}}}


def test_auto_path_on_a_cpu_without_native_bf16(avx2_only):
    from serve.scorer import resolve_path

    both = _export(**{"model.onnx": True, "model.int8.onnx": True, "torch-bf16": True})
    no_int8 = _export(**{"model.onnx": True, "model.int8.onnx": False, "torch-bf16": True})
    assert resolve_path("cpu", "auto", "auto", both) == ("cpu", "onnxruntime", "int8")
    assert resolve_path("cpu", "auto", "auto", no_int8) == ("cpu", "onnxruntime", "fp32")  # bf16 would be emulated
    assert resolve_path("cpu", "auto", "auto", None) == ("cpu", "torch", "fp32")
    with pytest.raises(PrecisionError, match="emulated"):
        resolve_path("cpu", "auto", "bf16", both)


def test_auto_path_on_a_cpu_with_native_bf16_and_refusals(bf16_cpu):
    from serve.scorer import resolve_path

    no_int8 = _export(**{"model.onnx": True, "model.int8.onnx": False, "torch-bf16": True})
    assert resolve_path("cpu", "auto", "auto", no_int8) == ("cpu", "torch", "bf16")
    assert resolve_path("cpu", "auto", "bf16", None) == ("cpu", "torch", "bf16")
    assert resolve_path("cpu", "torch", "auto", no_int8) == ("cpu", "torch", "bf16")
    assert resolve_path("cpu", "auto", "int8", None) == ("cpu", "onnxruntime", "int8")
    for device, backend, precision, message in (("cpu", "torch", "int8", "not available"),
                                                ("cpu", "onnxruntime", "bf16", "not available"),
                                                ("cpu", "torch", "fp16", "not available"),
                                                ("cuda", "onnxruntime", "fp16", "runs on CPU")):
        with pytest.raises(PrecisionError, match=message):
            resolve_path(device, backend, precision, no_int8)


def test_export_command_writes_the_files_and_reports_parity(tmp_path, capsys):
    from workflows.cli import main

    folder = tiny_student(tmp_path / "student", "poly")
    data = tmp_path / "check.jsonl"
    rows = [json.loads(x) for x in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[:20]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["export", str(folder), "--format", "onnx", "--quantize", "int8", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "model.onnx: max |logit diff|" in out and "model.int8.onnx" in out and "20 pairs" in out
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.int8.onnx", "onnx_export.json"}
    assert main(["export", str(tmp_path / "nothing")]) == 2
