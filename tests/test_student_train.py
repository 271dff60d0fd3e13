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
    assert ex["has_target"].tolist() == [1.0, 1.0, 0.0]
    filled = ex["targets"][0, 2]  # the missing perspective gets the mean of the others
    torch.testing.assert_close(filled, (ex["targets"][0, 0] + ex["targets"][0, 1]) / 2)
    assert ex["teacher_probs"][0].tolist() == pytest.approx([0.5, 0, 0, 0.5])
    assert ex["teacher_probs"][1].tolist() == pytest.approx([0.25] * 4)  # no votes: uniform


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
    assert history[-1]["train_latent"] < history[0]["train_latent"]
    best = LRKDStudent.from_pretrained(tmp_path / "s" / "best")
    assert best.cfg.extractor == "poly" and best.cfg.mode == "unified"
    out = predict(best, val, AutoTokenizer.from_pretrained(tmp_path / "s" / "best"), 64)
    assert out["probs"].shape == (32, 4) and out["perspective_scores"].shape == (32, 3)
    from sklearn.metrics import f1_score

    f1 = f1_score(val["label"].numpy(), out["probs"].argmax(-1).numpy(), average="macro", labels=[0, 1, 2, 3], zero_division=0)
    assert f1 == pytest.approx(max(h["val_macro_f1"] for h in history), abs=1e-6), "best/ holds the best epoch"
