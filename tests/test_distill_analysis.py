"""What the distill stage concludes from trained students: paired verdicts, target samples and probes, and which
student is served. No training here: the inputs are built by hand."""
import json

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import f1_score

from student.evaluate import ONE_SEED, macro_f1_fast, paired_bootstrap
from student.examples import keep_mask
from workflows.stages.probe import informativeness
from workflows.stages.targets import stratified_sample
from workflows.stages.verdicts import verdicts


def test_fast_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, size=(5, 60))
    pred = rng.integers(0, 3, size=(5, 60))  # class 3 never predicted: F1 0 counts in the mean
    fast = macro_f1_fast(gold, pred, 4)
    for i in range(5):
        assert fast[i] == pytest.approx(f1_score(gold[i], pred[i], labels=[0, 1, 2, 3], average="macro", zero_division=0))


def test_paired_bootstrap_verdicts():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 4, size=200).tolist()
    noisy = {s: [g if rng.random() < 0.5 else int(rng.integers(0, 4)) for g in gold] for s in range(3)}
    better = {s: [g if rng.random() < 0.9 else int(rng.integers(0, 4)) for g in gold] for s in range(3)}
    same = paired_bootstrap(gold, noisy, noisy, 4, resamples=300)
    # identical predictions: the interval is [0, 0], inside any margin
    assert same["mean_diff"] == 0 and same["ci95"] == [0, 0] and same["verdict"] == "equivalent within ±0.02"
    helps = paired_bootstrap(gold, better, noisy, 4, resamples=300)
    assert helps["verdict"] == "better" and helps["ci95"][0] > 0 and helps["seeds"] == [0, 1, 2]
    assert paired_bootstrap(gold, noisy, better, 4, resamples=300)["verdict"] == "worse"
    # two predictors that differ by chance on a few pairs: the interval holds 0 and stays inside a wide margin ...
    flip = {s: [p if i % 50 else (p + 1) % 4 for i, p in enumerate(noisy[s])] for s in range(3)}
    wide = paired_bootstrap(gold, flip, noisy, 4, resamples=300, margin=0.1)
    assert wide["ci95"][0] < 0 < wide["ci95"][1] and wide["verdict"] == "equivalent within ±0.1"
    # ... but not inside a narrow one: not enough data to tell, never "the same"
    assert paired_bootstrap(gold, flip, noisy, 4, resamples=300, margin=0.001)["verdict"].startswith("not enough data")
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap(gold, {5: noisy[0]}, noisy, 4)
    # one seed: the interval leaves out seed-to-seed variation, so even a clear gain is not called
    one = paired_bootstrap(gold, {0: better[0]}, {0: noisy[0]}, 4, resamples=300)
    assert one["ci95"][0] > 0 and one["verdict"] == ONE_SEED == "no verdict (1 seed)"


def test_verdicts_pair_each_lrkd_variant_with_its_lambda_zero_twin(tmp_path):
    """Each run's predictions are read from its scored parts, joined on pair_id (written here in another order than
    the split's); a run whose parts miss a pair is an error, not a verdict on shifted labels."""
    import pyarrow.parquet as pq

    codes = ["E", "S", "C", "I"]
    gold = [0, 1, 2, 3] * 10
    test = pa.table({"pair_id": [f"p{i}" for i in range(40)], "label": [codes[g] for g in gold]})
    runs = []
    for v in ("vanilla", "logit_kd", "lrkd-poly-unified", "lrkd-poly-unified-lam0.3-label_text", "lrkd-poly-unified-lam0"):
        for s in (0, 1):
            pred = gold if v != "lrkd-poly-unified-lam0" else [0] * 40
            folder = tmp_path / f"{v}-{s}"
            folder.mkdir()
            order = np.random.default_rng(s).permutation(40)
            pq.write_table(pa.table({"pair_id": [f"p{i}" for i in order], "label": [codes[pred[i]] for i in order]}),
                           folder / "part-0.parquet")
            runs.append({"variant": v, "seed": s, "metrics": {}, "predictions": str(folder)})
    v = verdicts(runs, codes, 200, test)
    assert set(v) == {"logit_kd", "lrkd-poly-unified", "lrkd-poly-unified-lam0.3-label_text"}
    assert v["lrkd-poly-unified"]["against"] == "lrkd-poly-unified-lam0" and v["lrkd-poly-unified"]["verdict"].startswith("better")
    assert v["logit_kd"]["against"] == "vanilla" and v["logit_kd"]["verdict"] == "equivalent within ±0.02"
    lost = tmp_path / "vanilla-1" / "part-0.parquet"
    pq.write_table(pq.read_table(lost).slice(1), lost)
    with pytest.raises(ValueError, match=r"39 scored pairs where the split has 40 \(1 of its pairs missing\)"):
        verdicts(runs, codes, 200, test)


def test_target_sample_is_seeded_and_stratified():
    labels = ["I"] * 50 + ["E"] * 30 + ["S"] * 15 + ["C"] * 5
    table = pa.table({"pair_id": [f"p{i}" for i in range(100)], "label": labels})
    a, b, c = stratified_sample(table, 20, 0), stratified_sample(table, 20, 0), stratified_sample(table, 20, 1)
    counts = {lab: a.column("label").to_pylist().count(lab) for lab in "IESC"}
    assert counts == {"I": 10, "E": 6, "S": 3, "C": 1} and a.num_rows == 20
    assert a.equals(b) and not a.equals(c)
    ids = [int(p[1:]) for p in a.column("pair_id").to_pylist()]
    assert ids == sorted(ids) and ids != list(range(20))  # not the first N rows, and in the table's order
    assert stratified_sample(table, None, 0).equals(table)


def test_target_filter():
    rows = pa.table({"parse_ok": [True, True, False], "correct": [True, False, False]})  # good, wrong, broken
    assert keep_mask(rows, "correct").tolist() == [True, False, False]
    assert keep_mask(rows, "parsed").tolist() == [True, True, False]
    assert keep_mask(rows, "all").tolist() == [True, True, True]


def _rows(emb, labels, perspective="user_intent", correct=True):
    return [{"pair_id": f"p{i}", "perspective": perspective, "split": "train", "embedding": e.tolist(), "gold_label": y,
             "parse_ok": True, "correct": correct} for i, (e, y) in enumerate(zip(emb, labels))]


def test_probe_tells_informative_targets_from_noise():
    rng = np.random.default_rng(0)
    labels = ["E", "S", "I"] * 30
    protos = {c: rng.normal(size=16) for c in "ESI"}
    informative = np.stack([protos[y] + 0.3 * rng.normal(size=16) for y in labels])
    noise = rng.normal(size=(90, 16))
    table = pa.Table.from_pylist(_rows(informative, labels) + _rows(noise, labels, "business_rules")
                                 + _rows(noise[:3], ["E"] * 3, "structured_analysis", correct=True))
    probe = informativeness(table, ["user_intent", "business_rules", "structured_analysis"], "correct")
    assert probe["user_intent"]["macro_f1"] > 0.9 and probe["user_intent"]["folds"] == 5
    assert probe["business_rules"]["macro_f1"] < 0.6
    assert probe["user_intent"]["majority_macro_f1"] == pytest.approx(1 / 6)  # one class of three, F1 0.5
    assert "nothing to probe" in probe["structured_analysis"]["note"]
    # the filter applies: wrong rationales are not probed under `correct`
    wrong = pa.Table.from_pylist(_rows(informative, labels, correct=False))
    assert informativeness(wrong, ["user_intent"], "correct")["user_intent"]["rows"] == 0
    assert informativeness(wrong, ["user_intent"], "parsed")["user_intent"]["rows"] == 90


def _run_dir(tmp_path, val: dict, test: dict):
    runs = [{"variant": v, "seed": s, "metrics": {"macro_f1": test[v][s], "val": {"macro_f1": val[v][s]}}}
            for v in val for s in val[v]]
    (tmp_path / "student").mkdir(parents=True, exist_ok=True)
    (tmp_path / "student" / "metrics.json").write_text(json.dumps({"runs": runs, "variants": {}}))
    return tmp_path


def test_served_student_is_chosen_on_validation_only(tmp_path):
    from serve.launch import find_student

    val = {"lrkd-poly-unified": {0: 0.40, 1: 0.42}, "lrkd-gat-unified": {0: 0.30, 1: 0.31},
           "lrkd-poly-unified-lam0": {0: 0.60, 1: 0.60}, "vanilla": {0: 0.70, 1: 0.70}}
    test = {"lrkd-poly-unified": {0: 0.10, 1: 0.10}, "lrkd-gat-unified": {0: 0.90, 1: 0.95},
            "lrkd-poly-unified-lam0": {0: 0.9, 1: 0.9}, "vanilla": {0: 0.9, 1: 0.9}}
    chosen = find_student(_run_dir(tmp_path, val, test))
    assert chosen == tmp_path / "student" / "variants" / "lrkd-poly-unified-seed1" / "best"
    # any test metrics: the same choice
    flipped = {v: {s: 1 - x for s, x in seeds.items()} for v, seeds in test.items()}
    assert find_student(_run_dir(tmp_path, val, flipped)) == chosen


def test_single_perspective_variant_reads_only_that_perspectives_targets(tmp_path):
    """The variant trained on one perspective's targets masks the others in training (perspective_mask, multiplied
    into target_mask) and in its fidelity on validation (the scoring actor counts only that perspective)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from conftest import ROOT
    from student.config import DistillConfig
    from student.data import column_matrix, examples_table
    from student.model import LRKDStudent, StudentConfig
    from student.score import StudentPredictor
    from student.train import perspective_mask
    from workflows.models import TINY_BERT, resolve_model

    persp = ["user_intent", "structured_analysis", "business_rules"]
    d = DistillConfig(seeds=[0])
    alone = d.ablation_variants(persp)[-2]  # structured_analysis alone
    assert alone.name == "lrkd-poly-unified-only_structured_analysis" and alone.target_perspectives == ["structured_analysis"]
    assert perspective_mask(alone.target_perspectives, persp).tolist() == [0, 1, 0]
    assert perspective_mask(d.lrkd("poly", "unified", 0.1, 0).target_perspectives, persp).tolist() == [1, 1, 1]

    encoder = resolve_model(TINY_BERT)
    model = LRKDStudent.from_encoder(encoder, StudentConfig(labels=["E", "S", "C", "I"], perspectives=persp, target_dim=4))
    model.save_pretrained(tmp_path / "s", tokenizer=AutoTokenizer.from_pretrained(encoder))
    rows = [json.loads(x) for x in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[:6]]
    pairs = [{"pair_id": r["pair_id"], "query": r["query"], "title": r["product_title"], "label": r["label"]} for r in rows]
    targets = {(p["pair_id"], k): np.ones(4, np.float32) for p in pairs for k in persp}
    table = examples_table(pairs, ["E", "S", "C", "I"], persp, targets, target_dim=4)
    trivial = np.full((3, 4), 0.5, np.float32).tolist()
    one = StudentPredictor(str(tmp_path / "s"), trivial=trivial, keep=alone.target_perspectives)(table)
    assert column_matrix(one, "has_target").tolist() == [[0, 1, 0]] * 6
    every = StudentPredictor(str(tmp_path / "s"), trivial=trivial)(table)
    assert column_matrix(every, "has_target").tolist() == [[1, 1, 1]] * 6
    assert torch.equal(torch.tensor(column_matrix(one, "student_cos")), torch.tensor(column_matrix(every, "student_cos")))
