"""A vanilla student's folder loads with sentence-transformers' `CrossEncoder(path)` (safetensors, no remote code)
and gives the logits of the project's own forward on real bundled pairs; an LRKD student's folder does not claim to.
No Ray."""
import json

import numpy as np
import pytest
import torch

from test_export import PERSPECTIVES, labelled_split

MAX_DIFF = 1e-5


def _student(folder, backbone: str, extractor: str, segment_ids: bool | None = None):
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import resolve_model

    enc = resolve_model(backbone)
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(enc, StudentConfig(labels=["E", "S", "C", "I"], extractor=extractor, mode="unified",
                                                        perspectives=PERSPECTIVES, target_dim=8, poly_codes=6, max_length=40,
                                                        segment_ids=segment_ids))
    with torch.no_grad():  # a head with real spread, so that a wrong mapping cannot hide in near-zero logits
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.5)
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(enc))
    return folder


def _own_logits(folder, pairs, batch_size=16) -> np.ndarray:
    from transformers import AutoTokenizer

    from student.data import encode_pairs
    from student.model import LRKDStudent

    model = LRKDStudent.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        enc = encode_pairs(tok, [q for q, _ in chunk], [p for _, p in chunk], model.cfg.max_length)
        with torch.inference_mode():
            out.append(model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))["logits"].numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("backbone,segment_ids", [("tiny-random-bert", None), ("all-minilm-l6-v2", None),
                                                   ("all-minilm-l6-v2", False)])
def test_vanilla_student_loads_as_a_cross_encoder_with_the_same_logits(tmp_path, backbone, segment_ids):
    """segment_ids False: a student that keeps every token in segment 0 (those saved before the setting) gets a
    CrossEncoder whose tokenizer makes no token_type_ids."""
    from sentence_transformers import CrossEncoder

    folder = _student(tmp_path / "vanilla", backbone, "none", segment_ids)
    pairs, _ = labelled_split("test")  # 108 real pairs; max length 40 truncates many of them, query or product side
    ce = CrossEncoder(str(folder), device="cpu", trust_remote_code=False)
    assert ce.num_labels == 4 and ce.max_seq_length == 40
    # one by one (the same function: measured 0) and in batches of 16 (the CrossEncoder sorts pairs by length
    # before batching, so a pair shares its padding with other pairs than in ours: measured 5.7e-6 with MiniLM)
    for batch_size, some in ((1, pairs[:24]), (16, pairs)):
        theirs = ce.predict(some, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        ours = _own_logits(folder, some, batch_size)
        assert theirs.shape == ours.shape == (len(some), 4)
        diff = float(np.abs(theirs - ours).max())
        assert diff <= MAX_DIFF, f"batch {batch_size}: CrossEncoder logits differ from the student's by {diff:.2e}"
        assert np.abs(ours).max() > 1.0  # the comparison is not between two near-zero outputs
    # the encoder weights are the student's own file, not a copy; the classifier is read from it once more
    dense = (folder / "2_Dense" / "model.safetensors").stat().st_size
    assert not list(folder.glob("0_*")) and dense < 0.1 * (folder / "model.safetensors").stat().st_size
    assert not any(p.suffix in (".bin", ".pt", ".pkl", ".py") for p in folder.rglob("*"))


def test_lrkd_student_folder_is_not_a_cross_encoder_and_a_resave_drops_a_stale_layout(tmp_path):
    from student.interop import ST_FILES, supported
    from student.model import LRKDStudent

    folder = _student(tmp_path / "lrkd", "tiny-random-bert", "poly")
    assert not any((folder / name).exists() for name in ST_FILES)
    assert "extractor (poly)" in supported(LRKDStudent.from_pretrained(folder), object())
    # a vanilla folder rewritten with an LRKD student (same path) loses the CrossEncoder files it no longer matches
    vanilla = _student(tmp_path / "same", "tiny-random-bert", "none")
    assert json.loads((vanilla / "modules.json").read_text())[2]["path"] == "2_Dense"
    _student(vanilla, "tiny-random-bert", "gat")
    assert not any((vanilla / name).exists() for name in ST_FILES)
