"""A stage is skipped only when everything its output depends on is unchanged: change an input, rerun, and the
stage reruns with output that reflects the new input; work made from other inputs is discarded, not resumed."""
import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_partial_work_of_other_inputs_is_discarded(tmp_path):
    from workflows.artifacts import start_attempt

    work = tmp_path / "student"
    start_attempt(work, "cfg", "student", {"targets": "aaa"})
    (work / "trained.json").write_text("{}")
    (work / "best").mkdir()
    start_attempt(work, "cfg", "student", {"targets": "aaa"})  # the same config and inputs: resumed
    assert (work / "trained.json").exists() and (work / "best").exists()
    start_attempt(work, "cfg", "student", {"targets": "bbb"})  # other targets: nothing of the old student survives
    assert not (work / "trained.json").exists() and not (work / "best").exists()


def test_paired_verdicts_refuse_misaligned_predictions(tmp_path):
    """A scored split missing a pair is an error, not a shifted list of predictions."""
    from student.evaluate import paired_bootstrap
    from student.score import metrics_from_parts

    parts = tmp_path / "test"
    parts.mkdir()
    pq.write_table(pa.table({"pair_id": ["b", "a"], "query_id": ["q", "q"], "gold": ["E", "I"], "label": ["E", "E"],
                             "score": [0.9, 0.8], "dominant_perspective": [None, None]}), parts / "part-0.parquet")
    ok = metrics_from_parts(parts, ["E", "I"], [], {"E": 1.0, "I": 0.0}, order=pa.array(["a", "b"]))
    assert ok["predictions"] == [0, 0] and ok["n"] == 2
    with pytest.raises(ValueError, match=r"2 scored labelled pairs where the split has 3 \(1 of its pairs missing\)"):
        metrics_from_parts(parts, ["E", "I"], [], {"E": 1.0, "I": 0.0}, order=pa.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="one prediction per test pair"):
        paired_bootstrap([0, 1, 1], {0: [0, 1], 1: [0, 1, 1]}, {0: [0, 1, 1], 1: [0, 1, 1]}, 2)


@pytest.mark.ray
def test_students_retrain_exactly_when_what_they_read_changes(tmp_path, ray_local, monkeypatch):
    """Vanilla, LRKD (lambda > 0) and its lambda = 0 control from label_text targets (no LLM). The control has its
    twin's architecture (target width, centroids), not vanilla's. New targets (what a retrained teacher writes)
    retrain the two LRKD students, which read them, and leave vanilla as it was."""
    from student.train import Variant
    from workflows.config import load_config
    from workflows.stages.students import train_variants

    monkeypatch.chdir(ROOT)  # the config's data path is relative to the repository
    cfg = load_config("configs/smoke.yaml", [
        "distill.target_source=label_text", "distill.max_target_pairs=null", "distill.fidelity_pairs=null",
        "data.split={train: 0.3, val: 0.1, test: 0.6, seed: 0}",
        "distill.train={num_workers: 2, epochs: 1, batch_size: 32, learning_rate: 1.0e-3, latent_dim: 16, poly_codes: 6}"])
    run = tmp_path / "run"
    d = cfg.distill
    variants = [Variant("vanilla", "vanilla", seed=0), d.lrkd("poly", "unified", 0.1, 0), d.lrkd("poly", "unified", 0.0, 0)]
    train_variants(cfg, run, variants)
    folders = {v.name: run / "student" / "variants" / f"{v.name}-seed0" for v in variants}
    width = {n: json.loads((f / "best" / "student_config.json").read_text())["target_dim"] for n, f in folders.items()}
    assert width["lrkd-poly-unified-lam0"] == width["lrkd-poly-unified"] == 384 and width["vanilla"] == 1
    before = {n: _digest(f / "best" / "model.safetensors") for n, f in folders.items()}
    # a rerun with nothing changed trains nothing
    train_variants(cfg, run, variants)
    assert {n: _digest(f / "best" / "model.safetensors") for n, f in folders.items()} == before
    # new targets at the same path (their label texts' embeddings scaled: other content, same shape)
    targets = run / "student" / "targets" / "label_text" / "targets.parquet"
    for f in sorted(targets.glob("*.parquet")):
        t = pq.read_table(f)
        emb = t.column("embedding").combine_chunks()
        vals = emb.flatten().to_numpy(zero_copy_only=False)[::-1].copy()  # reversed vectors: other targets
        t = t.set_column(t.schema.get_field_index("embedding"), "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vals), emb.type.list_size))
        pq.write_table(t, f)
    (run / "student" / "targets" / "label_text" / "centroids.json").unlink(missing_ok=True)
    train_variants(cfg, run, variants)
    after = {n: _digest(f / "best" / "model.safetensors") for n, f in folders.items()}
    assert after["vanilla"] == before["vanilla"]
    assert after["lrkd-poly-unified"] != before["lrkd-poly-unified"] and after["lrkd-poly-unified-lam0"] != before["lrkd-poly-unified-lam0"]
    from workflows.artifacts import fingerprint

    for n in ("lrkd-poly-unified", "lrkd-poly-unified-lam0"):
        assert json.loads((folders[n] / "manifest.json").read_text())["inputs"]["targets_label_text"] == fingerprint(targets)
    # killed inside the driver's rewrite of the scored parts (a folder deleted, not yet renamed): only scored again
    lam0 = folders["lrkd-poly-unified-lam0"]
    scores = json.loads((lam0 / "eval.json").read_text())
    (lam0 / "manifest.json").unlink()
    shutil.rmtree(lam0 / "predictions" / "test")
    train_variants(cfg, run, variants)
    assert {n: _digest(f / "best" / "model.safetensors") for n, f in folders.items()} == after
    assert json.loads((lam0 / "eval.json").read_text()) == scores


@pytest.mark.ray
def test_score_reruns_when_its_input_file_changes(tmp_path, ray_local):
    from workflows.stages.score import score_file

    rows = (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[:60]
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "scored.parquet"
    pairs.write_text("\n".join(rows) + "\n")
    student = _tiny_student(tmp_path / "student")
    assert score_file(str(pairs), str(student), str(out), progress=False)["n"] == 60
    pairs.write_text("\n".join(rows[:25]) + "\n")  # the same path, other pairs
    m = score_file(str(pairs), str(student), str(out), progress=False)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert m["n"] == 25 and manifest["scored_now"] == 25 and manifest["reused"] == 0
    assert pq.read_table(out).num_rows == 25


def _tiny_student(out):
    import torch
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import TINY_BERT, resolve_model

    encoder = resolve_model(TINY_BERT)
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(encoder, StudentConfig(labels=["E", "S", "C", "I"],
                                                            perspectives=["user_intent", "structured_analysis", "business_rules"],
                                                            target_dim=8, max_length=64))
    model.save_pretrained(out / "best", tokenizer=AutoTokenizer.from_pretrained(encoder))
    return out / "best"
