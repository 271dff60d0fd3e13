import pytest
import torch
import torch.nn.functional as F

from student.model import LatentReasoningExtractor, LRKDStudent, StudentConfig, lrkd_loss, logit_kd_loss

LABELS, PERSP = ["E", "S", "C", "I"], ["user_intent", "structured_analysis", "business_rules"]
EXTRACTORS = ["mlp", "poly", "gat"]
MODES = ["average", "multi_teacher", "unified"]


@pytest.fixture(scope="module")
def encoder_path():
    from workflows.models import TINY_BERT, resolve_model

    return resolve_model(TINY_BERT)


def student(encoder_path, extractor="poly", mode="unified", **kw):
    torch.manual_seed(0)
    cfg = StudentConfig(labels=LABELS, perspectives=PERSP, extractor=extractor, mode=mode, latent_dim=16,
                        poly_codes=6, target_dim=8, **kw)
    return LRKDStudent.from_encoder(encoder_path, cfg).eval()


def batch(seq=10, pad=0, b=3):
    torch.manual_seed(1)
    ids = torch.randint(5, 500, (b, seq))
    mask = torch.ones(b, seq, dtype=torch.long)
    if pad:
        ids = torch.cat([ids, torch.zeros(b, pad, dtype=torch.long)], 1)
        mask = torch.cat([mask, torch.zeros(b, pad, dtype=torch.long)], 1)
    return ids, mask


@pytest.mark.parametrize("extractor", EXTRACTORS)
@pytest.mark.parametrize("mode", MODES)
def test_shapes_for_every_extractor_and_mode(encoder_path, extractor, mode):
    m = student(encoder_path, extractor, mode)
    ids, mask = batch()
    out = m(ids, mask)
    k = 3 if mode == "unified" else 1
    assert out["logits"].shape == (3, 4)
    assert out["slots"].shape[:2] == (3, k) and out["z"].shape == (3, out["slots"].shape[2])
    assert m.projected(out).shape == (3, 1 if mode == "average" else 3, 8)
    assert m.perspective_scores(out).shape == (3, 3)


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_padding_changes_nothing(encoder_path, extractor):
    m = student(encoder_path, extractor)
    ids, mask = batch()
    pids, pmask = batch(pad=7)
    with torch.no_grad():
        a, b = m(ids, mask), m(pids, pmask)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["z"], b["z"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extractor", EXTRACTORS)
@pytest.mark.parametrize("mode", MODES)
def test_extractor_adds_under_1m_params_at_bert_base_width(extractor, mode):
    cfg = StudentConfig(labels=LABELS, perspectives=PERSP, extractor=extractor, mode=mode)
    n = LatentReasoningExtractor(extractor, 768, cfg).num_parameters()
    assert 0 < n < 1_000_000, n


def test_poly_is_small_like_the_paper():
    cfg = StudentConfig(labels=LABELS, perspectives=PERSP, extractor="poly", poly_codes=36)
    assert LatentReasoningExtractor("poly", 768, cfg).num_parameters() < 30_000


def test_lambda_zero_is_the_plain_cross_entropy(encoder_path):
    m = student(encoder_path)
    ids, mask = batch()
    y = torch.tensor([0, 3, 1])
    out = m(ids, mask)
    loss, parts = lrkd_loss(m, out, y, torch.randn(3, 3, 8), lam=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(out["logits"], y).item())
    loss.backward()
    assert all(p.grad is None for p in m.projections.parameters()), "no gradient reaches P when lambda = 0"
    assert parts["latent"] == 0.0


def test_latent_term_uses_each_mode(encoder_path):
    targets = F.normalize(torch.randn(3, 3, 8), dim=-1)
    y = torch.tensor([0, 3, 1])
    ids, mask = batch()
    for mode in MODES:
        m = student(encoder_path, "mlp", mode)
        out = m(ids, mask)
        _, parts = lrkd_loss(m, out, y, targets, lam=0.1)
        proj = m.projected(out)
        if mode == "average":
            expected = F.mse_loss(proj[:, 0], targets.mean(1))
        else:
            expected = sum(F.mse_loss(proj[:, k], targets[:, k]) for k in range(3))
        assert parts["latent"] == pytest.approx(expected.item(), rel=1e-5)


def test_logit_kd_is_zero_kd_when_student_matches_teacher(encoder_path):
    m = student(encoder_path, extractor="none")
    ids, mask = batch()
    out = m(ids, mask)
    probs = out["logits"].softmax(-1).detach()
    _, parts = logit_kd_loss(out, torch.tensor([0, 1, 2]), probs, alpha=1.0)
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6)


def test_save_load_round_trip_restores_logits_exactly(encoder_path, tmp_path):
    from transformers import AutoTokenizer

    m = student(encoder_path, "gat", "multi_teacher")
    m.centroids.copy_(torch.randn(3, 8))
    m.save_pretrained(tmp_path / "s", tokenizer=AutoTokenizer.from_pretrained(encoder_path))
    back = LRKDStudent.from_pretrained(tmp_path / "s")
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask)["logits"], back(ids, mask)["logits"], rtol=0, atol=0)
    torch.testing.assert_close(m.centroids, back.centroids)
    assert (tmp_path / "s" / "model.safetensors").exists() and (tmp_path / "s" / "tokenizer.json").exists()
