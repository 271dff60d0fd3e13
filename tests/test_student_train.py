"""Student training on Ray Train with a tiny random BERT and real ESCI pairs."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT
from student.data import build_examples, class_weights, length_grouped_batches, product_text
from student.train import StudentTrainConfig, Variant, predict, train_student

LABELS, PERSP = ["E", "S", "C", "I"], ["user_intent", "structured_analysis", "business_rules"]


def esci(n, offset=0):
    rows = [json.loads(line) for line in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[offset : offset + n]]
    return [{"pair_id": r["pair_id"], "query": r["query"], "title": r["product_title"], "attributes": "{}", "label": r["label"]} for r in rows]


def fake_targets(pairs, dim=8):
    """A rationale embedding per (pair, perspective) that carries the label: what a useful teacher provides."""
    rng = np.random.default_rng(0)
    protos = {c: rng.normal(size=dim) for c in LABELS}
    out = {}
    for p in pairs:
        for k in PERSP:
            v = protos[p["label"]] + 0.1 * rng.normal(size=dim)
            out[(p["pair_id"], k)] = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def test_build_examples_targets_mask_and_teacher_distribution():
    pairs = esci(3)
    targets = fake_targets(pairs[:2])
    del targets[(pairs[0]["pair_id"], "business_rules")]
    votes = {(pairs[0]["pair_id"], "user_intent"): "E", (pairs[0]["pair_id"], "structured_analysis"): "I"}
    ex = build_examples(pairs, LABELS, PERSP, targets, votes, target_dim=8, smoothing=0.0)
    # a missing (pair, perspective) is masked, not filled: the guidance term skips it
    assert ex["target_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert ex["targets"][0, 2].abs().sum() == 0
    assert ex["teacher_probs"][0].tolist() == pytest.approx([0.5, 0, 0, 0.5])
    assert ex["has_votes"].tolist() == [1.0, 0.0, 0.0]  # logit-KD skips pairs the teacher did not vote on


def test_gold_labels_never_reach_the_students_inputs():
    """Gold-conditioned and label_text targets are written from the gold label; the student's inputs are the
    query and product text alone, identical whatever the labels and targets are."""
    from mpcot.labels import DEFAULT_ESCI_LABELS, Label
    from mpcot.perspectives import DEFAULT_PERSPECTIVES, Perspective
    from mpcot.prompts import build_messages
    from student.train import _batches
    from transformers import AutoTokenizer
    from workflows.models import TINY_BERT, resolve_model

    labels = [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
    pairs = esci(12)
    prompt = build_messages({"query": pairs[0]["query"], "title": pairs[0]["title"], "attributes": {}},
                            Perspective(**DEFAULT_PERSPECTIVES[0]), labels, gold=labels[0])
    assert "The correct label is Exact" in prompt[-1]["content"]  # the teacher is told ...
    assert "correct label" not in build_messages({"query": "q", "title": "t", "attributes": {}},
                                                 Perspective(**DEFAULT_PERSPECTIVES[0]), labels)[-1]["content"]
    relabelled = [dict(p, label=LABELS[(LABELS.index(p["label"]) + 1) % 4]) for p in pairs]
    a = build_examples(pairs, LABELS, PERSP, fake_targets(pairs), {}, target_dim=8)
    b = build_examples(relabelled, LABELS, PERSP, None, None, target_dim=8)
    assert a["query"] == b["query"] and a["product"] == b["product"]
    assert not any(lab.description in text for lab in labels for text in a["product"] + a["query"])
    tok = AutoTokenizer.from_pretrained(resolve_model(TINY_BERT))
    ea, eb = _batches(a, list(range(12)), tok, 64, "cpu"), _batches(b, list(range(12)), tok, 64, "cpu")
    assert torch.equal(ea["input_ids"], eb["input_ids"]) and torch.equal(ea["attention_mask"], eb["attention_mask"])
    assert not torch.equal(ea["label"], eb["label"])  # ... and only the label and targets differ


def test_length_grouped_batches_pad_less_and_keep_ranks_in_step():
    rng = np.random.default_rng(1)
    lengths = rng.integers(8, 64, size=203).tolist()
    ranks = length_grouped_batches(lengths, batch_size=16, world=2, seed=3)
    assert len(ranks[0]) == len(ranks[1]) == 203 // 16 // 2  # same number of steps on every rank
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) >= 203 - 16 * 2  # no pair twice; at most `world` batches wait for next epoch
    padded = sum(len(b) * max(lengths[i] for i in b) for r in ranks for b in r)
    order = rng.permutation(203)[: len(seen)]
    random_padded = sum(16 * max(lengths[i] for i in order[j : j + 16]) for j in range(0, len(order), 16))
    assert padded < 0.8 * random_padded
    assert length_grouped_batches(lengths, 16, 2, seed=4) != ranks  # reshuffled every epoch
    assert [len(r) for r in length_grouped_batches(lengths[:10], 16, 2, seed=0)] == [1, 1]  # tiny data: a batch each


def test_product_text_adds_attributes_and_inverse_frequency_weights():
    assert product_text("Kettle", json.dumps({"brand": "Acme", "color": "<b>red</b>"})) == "Kettle | brand: Acme | color: red"
    w = class_weights(torch.tensor([0, 0, 0, 1]), 4, "inverse_frequency")
    assert w[1] > w[0] > 0 and w[2] == w[3] == 0
    assert class_weights(torch.tensor([0, 1]), 4, "none") is None


@pytest.mark.ray
def test_student_trains_on_two_workers_and_keeps_best(tmp_path, ray_local):
    from student.model import LRKDStudent
    from transformers import AutoTokenizer
    from workflows.models import TINY_BERT, resolve_model

    encoder = resolve_model(TINY_BERT)
    train_pairs, val_pairs = esci(96), esci(32, offset=96)
    targets = fake_targets(train_pairs + val_pairs)
    train = build_examples(train_pairs, LABELS, PERSP, targets, target_dim=8)
    val = build_examples(val_pairs, LABELS, PERSP, targets, target_dim=8)
    centroids = train["targets"].mean(0).tolist()
    settings = StudentTrainConfig(num_workers=2, epochs=4, batch_size=16, learning_rate=1e-3, patience=4, latent_dim=16, poly_codes=6)
    variant = Variant("lrkd-poly-unified", "lrkd", "poly", "unified", lam=0.5, seed=0)
    history = train_student(variant, settings, train, val, encoder, LABELS, PERSP, centroids, tmp_path / "s")
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["train_ce"] < history[0]["train_ce"]
    # every epoch records the guidance diagnostics; the guidance term reaches the encoder
    assert all(h["diag_grad_ratio"] > 0.05 and h["diag_guidance"] > 0 for h in history)
    best = LRKDStudent.from_pretrained(tmp_path / "s" / "best")
    assert best.cfg.extractor == "poly" and best.cfg.mode == "unified"
    tok = AutoTokenizer.from_pretrained(tmp_path / "s" / "best")
    out = predict(best, val, tok, best.cfg.max_length)  # what training evaluated with; 64 flipped a prediction on AVX2
    assert out["probs"].shape == (32, 4) and out["perspective_scores"].shape == (32, 3)
    # best/ holds the epoch selection chose: the reloaded weights give the logits it was chosen on (to float
    # tolerance: training ran with another thread count, which reorders sums), and that epoch is the best one
    selection = json.loads((tmp_path / "s" / "best" / "selection.json").read_text())
    assert selection["epoch"] == max(history, key=lambda h: (h["val_macro_f1"], -h["epoch"]))["epoch"]
    torch.testing.assert_close(out["logits"], torch.tensor(selection["val_logits"]), atol=1e-4, rtol=1e-4)


def test_latent_fidelity_against_the_trivial_predictor():
    """A student whose projections are the teacher's embeddings beats the mean-target predictor; one that answers
    the mean itself gains exactly 0; average mode compares the one projection with the mean target."""
    from student.evaluate import latent_fidelity

    pairs = esci(40)
    ex = build_examples(pairs, LABELS, PERSP, fake_targets(pairs), target_dim=8)
    train_t, train_m = ex["targets"][:30], ex["target_mask"][:30]
    val_t, val_m = ex["targets"][30:], ex["target_mask"][30:].clone()
    val_m[0, 1] = 0  # a perspective without a target is skipped
    perfect = latent_fidelity(val_t, val_t, val_m, train_t, train_m, "unified", PERSP)
    assert perfect["user_intent"]["student_cos"] == pytest.approx(1.0) and perfect["mean_gain"] > 0.05
    assert perfect["structured_analysis"]["n"] == 9 and perfect["user_intent"]["n"] == 10
    mean = train_t.mean(0, keepdim=True).expand_as(val_t)
    assert latent_fidelity(mean, val_t, val_m, train_t, train_m, "multi_teacher", PERSP)["mean_gain"] == pytest.approx(0, abs=1e-6)
    avg = latent_fidelity(val_t.mean(1, keepdim=True), val_t, val_m, train_t, train_m, "average", PERSP)
    assert list(avg) == ["average", "mean_gain"]
