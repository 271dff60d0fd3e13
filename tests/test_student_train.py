"""Student data, training on Ray Train fed by Ray Data, and scoring on Ray Data workers, with a tiny random BERT and
real ESCI pairs."""
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from student.data import Collator, class_weights, column_matrix, examples_table, product_text

LABELS, PERSP = ["E", "S", "C", "I"], ["user_intent", "structured_analysis", "business_rules"]


def esci(n, offset=0):
    rows = [json.loads(line) for line in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[offset : offset + n]]
    return [{"pair_id": r["pair_id"], "query_id": r["query_id"], "query": r["query"], "title": r["product_title"],
             "attributes": "{}", "label": r["label"]} for r in rows]


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


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    from workflows.models import TINY_BERT, resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(TINY_BERT))


def test_examples_targets_mask_and_teacher_distribution(tok):
    pairs = esci(3)
    targets = fake_targets(pairs[:2])
    del targets[(pairs[0]["pair_id"], "business_rules")]
    votes = {(pairs[0]["pair_id"], "user_intent"): "E", (pairs[0]["pair_id"], "structured_analysis"): "I"}
    table = examples_table(pairs, LABELS, PERSP, targets, votes, target_dim=8)
    b = Collator(tok, 64, 4, 3, batch_size=3, sort=False)(table)[0]
    # a missing (pair, perspective) is masked, not filled: the guidance term skips it
    assert b["target_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert b["targets"].shape == (3, 3, 8) and b["targets"][0, 2].abs().sum() == 0
    assert b["teacher_probs"][0].tolist() == pytest.approx([0.025 + 0.45, 0.025, 0.025, 0.025 + 0.45])
    assert b["has_votes"].tolist() == [1.0, 0.0, 0.0]  # logit-KD skips pairs the teacher did not vote on
    assert b["teacher_probs"][1].tolist() == pytest.approx([0.25] * 4)
    # a table without targets or votes collates to neutral values
    plain = Collator(tok, 64, 4, 3, batch_size=3, sort=False)(examples_table(pairs, LABELS, PERSP))[0]
    assert plain["target_mask"].sum() == 0 and plain["has_votes"].sum() == 0


def test_gold_labels_never_reach_the_students_inputs(tok):
    """Gold-conditioned and label_text targets are written from the gold label; the student's inputs are the
    query and product text alone, identical whatever the labels and targets are."""
    from mpcot.labels import DEFAULT_ESCI_LABELS, Label
    from mpcot.perspectives import DEFAULT_PERSPECTIVES, Perspective
    from mpcot.prompts import build_messages

    labels = [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
    pairs = esci(12)
    prompt = build_messages({"query": pairs[0]["query"], "title": pairs[0]["title"], "attributes": {}},
                            Perspective(**DEFAULT_PERSPECTIVES[0]), labels, gold=labels[0])
    assert "The correct label is Exact" in prompt[-1]["content"]  # the teacher is told ...
    assert "correct label" not in build_messages({"query": "q", "title": "t", "attributes": {}},
                                                 Perspective(**DEFAULT_PERSPECTIVES[0]), labels)[-1]["content"]
    relabelled = [dict(p, label=LABELS[(LABELS.index(p["label"]) + 1) % 4]) for p in pairs]
    a = examples_table(pairs, LABELS, PERSP, fake_targets(pairs), {}, target_dim=8)
    b = examples_table(relabelled, LABELS, PERSP)
    assert a.column("query").equals(b.column("query")) and a.column("product").equals(b.column("product"))
    assert not any(lab.description in text for lab in labels for text in a.column("product").to_pylist() + a.column("query").to_pylist())
    ea = Collator(tok, 64, 4, 3, batch_size=12, sort=False)(a)[0]
    eb = Collator(tok, 64, 4, 3, batch_size=12, sort=False)(b)[0]
    assert torch.equal(ea["input_ids"], eb["input_ids"]) and torch.equal(ea["attention_mask"], eb["attention_mask"])
    assert not torch.equal(ea["label"], eb["label"])  # ... and only the label and targets differ


def test_length_grouped_batches_pad_less_cover_every_pair_and_reshuffle(tok):
    table = examples_table(esci(203), LABELS, PERSP)
    grouped = Collator(tok, 64, 4, 3, batch_size=16, seed=3)(table)
    rows = [i for b in grouped for i in b["rows"].tolist()]
    assert sorted(rows) == list(range(203))  # every pair once
    assert all(torch.equal(b["label"], torch.from_numpy(table.column("label").to_numpy()[b["rows"].numpy()])) for b in grouped)
    padded = sum(b["input_ids"].numel() for b in grouped)
    plain = sum(b["input_ids"].numel() for b in Collator(tok, 64, 4, 3, batch_size=16, sort=False)(table))
    assert padded < 0.8 * plain
    again = Collator(tok, 64, 4, 3, batch_size=16, seed=4)(table)
    assert [b["rows"].tolist() for b in again] != [b["rows"].tolist() for b in grouped]  # reshuffled every epoch
    assert [b["rows"].tolist() for b in Collator(tok, 64, 4, 3, batch_size=16, seed=3)(table)] == [b["rows"].tolist() for b in grouped]


def test_product_text_adds_attributes_and_inverse_frequency_weights():
    assert product_text("Kettle", json.dumps({"brand": "Acme", "color": "<b>red</b>"})) == "Kettle | brand: Acme | color: red"
    w = class_weights([3, 1, 0, 0], 4, "inverse_frequency")
    assert w[1] > w[0] > 0 and w[2] == w[3] == 0
    assert class_weights([1, 1, 0, 0], 4, "none") is None


def test_train_loop_config_carries_no_data():
    """What every training worker is sent is settings and paths: its pickled size does not grow with the pairs."""
    from student.train import StudentJob, StudentTrainConfig, TrainData, Variant, train_loop_config

    def size(rows):
        data = TrainData(train="/data/train", val="/data/val", centroids=np.zeros((3, 1024)).tolist(),
                           label_counts=[rows // 4] * 4, rows=rows, target_dim=1024, probe="/data/probe.parquet")
        jobs = [StudentJob(Variant(f"v{i}", "lrkd", "poly", "unified", lam=0.1, seed=i), f"/out/{i}", "d") for i in range(30)]
        return len(pickle.dumps(train_loop_config(jobs, {"d": data.__dict__}, StudentTrainConfig(), "/enc", LABELS, PERSP)))

    small, large = size(1_000), size(2_600_000)
    assert large < 1_000_000 and abs(large - small) < 64


def _write(table: pa.Table, folder, parts=2):
    folder.mkdir(parents=True)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), folder / f"{i}.parquet")
    return folder


@pytest.mark.ray
def test_student_trains_on_two_workers_from_ray_data_and_keeps_best(tmp_path, ray_local, tok):
    from student.examples import PROBE, examples_summary
    from student.model import LRKDStudent
    from student.predict import predict
    from student.train import StudentTrainConfig, TrainData, Variant, train_student
    from workflows.models import TINY_BERT, resolve_model

    encoder = resolve_model(TINY_BERT)
    train_pairs, val_pairs = esci(96), esci(32, offset=96)
    targets = fake_targets(train_pairs + val_pairs)
    train = examples_table(train_pairs, LABELS, PERSP, targets, target_dim=8)
    val = examples_table(val_pairs, LABELS, PERSP, targets, target_dim=8)
    ex = tmp_path / "examples"
    _write(train, ex / "train", parts=3)
    _write(val, ex / "val")
    summary = examples_summary(ex / "train", LABELS, PERSP, probe_rows=16)
    assert summary["rows"] == 96 and sum(summary["label_counts"]) == 96
    centroids = column_matrix(train, "targets").reshape(96, 3, 8).mean(0).tolist()
    data = TrainData(str(ex / "train"), str(ex / "val"), centroids, summary["label_counts"], 96, 8, str(ex / f"train.{PROBE}"))
    settings = StudentTrainConfig(num_workers=2, epochs=4, batch_size=16, learning_rate=1e-3, patience=4, latent_dim=16,
                                  poly_codes=6, length_window=2, shuffle_buffer=64)
    variant = Variant("lrkd-poly-unified", "lrkd", "poly", "unified", lam=0.5, seed=0)
    history = train_student(variant, settings, data, encoder, LABELS, PERSP, tmp_path / "s")
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["train_ce"] < history[0]["train_ce"]
    # 96 pairs on 2 workers: 48 each, 3 steps of 16 per epoch on every rank, all pairs seen
    assert all(h["steps"] == 3 and h["train_pairs"] == 96 for h in history)
    # every epoch records the guidance diagnostics; the guidance term reaches the encoder
    assert all(h["diag_grad_ratio"] > 0.05 and h["diag_guidance"] > 0 for h in history)
    best = LRKDStudent.from_pretrained(tmp_path / "s" / "best")
    assert best.cfg.extractor == "poly" and best.cfg.mode == "unified"
    out = predict(best, val, tok, best.cfg.max_length)
    assert out["probs"].shape == (32, 4) and out["perspective_scores"].shape == (32, 3)
    # best/ holds the epoch selection chose: the reloaded weights give the logits it was chosen on (validation was
    # split across the two workers and gathered: every pair once), and that epoch is the best one
    selection = json.loads((tmp_path / "s" / "best" / "selection.json").read_text())
    assert selection["epoch"] == max(history, key=lambda h: (h["val_macro_f1"], -h["epoch"]))["epoch"]
    chosen = pq.read_table(tmp_path / "s" / "best" / "val_logits.parquet")
    assert sorted(chosen.column("pair_id").to_pylist()) == sorted(p["pair_id"] for p in val_pairs)
    by_id = dict(zip(chosen.column("pair_id").to_pylist(), column_matrix(chosen, "logits")))
    ours = np.stack([by_id[p["pair_id"]] for p in val_pairs])
    np.testing.assert_allclose(out["logits"].numpy(), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.ray
def test_examples_join_sparse_targets_by_pair(tmp_path, ray_local):
    """The stage's join: the pairs of each split left-joined with the sparse (pair, perspective) target rows, one row
    per pair, each embedding in its perspective's slot, the filter applied, votes from every parsed row; a split
    whose pairs have no targets gets zeros. Both ways of building them (Ray Data; one task for small inputs) agree."""
    from student.examples import examples_summary, write_examples

    pairs = esci(40)
    split = _write(pa.Table.from_pylist(pairs), tmp_path / "split", parts=1) / "0.parquet"
    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(pairs[:30]):  # pairs 30-39 have no target rows at all
        for j, k in enumerate(PERSP):
            if (i + j) % 4 == 3:
                continue  # some (pair, perspective) have none
            ok, correct = i % 5 != 0, i % 3 != 0
            rows.append({"pair_id": p["pair_id"], "perspective": k, "split": "train", "rationale": "r",
                         "predicted_label": ("E" if correct else "I") if ok else None, "gold_label": p["label"],
                         "parse_ok": ok, "correct": ok and correct, "embedding": rng.normal(size=4).astype(np.float32)})
    t = pa.Table.from_pylist(rows)
    t = t.set_column(t.schema.get_field_index("embedding"), "embedding",
                     pa.FixedSizeListArray.from_arrays(pa.array(np.stack([r["embedding"] for r in rows]).reshape(-1)), 4))
    targets = _write(t, tmp_path / "targets.parquet", parts=3)
    val_split = _write(pa.Table.from_pylist(esci(5, offset=40)), tmp_path / "val", parts=1) / "0.parquet"
    n = write_examples({"train": split, "val": val_split}, tmp_path / "ex", LABELS, PERSP, targets, "correct",
                       targets=True, votes=True, local_bytes=0)  # the Ray Data shuffle and join (large inputs)
    assert n == {"train": 40, "val": 5}
    got = pq.read_table(tmp_path / "ex" / "train")
    # small inputs are built in one task: the same rows and columns (polars' join writes large_string ids)
    assert write_examples({"train": split, "val": val_split}, tmp_path / "one", LABELS, PERSP, targets, "correct",
                          targets=True, votes=True) == n
    for s in ("train", "val"):
        a, b = (pq.read_table(tmp_path / d / s).sort_by("pair_id") for d in ("ex", "one"))
        assert a.column_names == b.column_names and a.equals(b.cast(a.schema)), s
    assert got.num_rows == 40 and len(set(got.column("pair_id").to_pylist())) == 40
    assert pq.read_table(tmp_path / "ex" / "val").column("target_mask").to_pylist() == [[0.0] * 3] * 5
    tgt = column_matrix(got, "targets").reshape(40, 3, 4)
    mask, votes = column_matrix(got, "target_mask"), column_matrix(got, "votes", np.int64)
    index = {p: i for i, p in enumerate(got.column("pair_id").to_pylist())}
    expect_mask, expect_votes = np.zeros((40, 3)), np.full((40, 3), -1)
    for r in rows:
        i, j = index[r["pair_id"]], PERSP.index(r["perspective"])
        if r["correct"]:
            expect_mask[i, j] = 1
            np.testing.assert_allclose(tgt[i, j], r["embedding"])
        if r["parse_ok"]:
            expect_votes[i, j] = LABELS.index(r["predicted_label"])
    np.testing.assert_array_equal(mask, expect_mask)
    np.testing.assert_array_equal(votes, expect_votes)
    assert np.all(tgt[mask == 0] == 0)
    labels = {p["pair_id"]: LABELS.index(p["label"]) for p in pairs}
    assert all(labels[p] == y for p, y in zip(got.column("pair_id").to_pylist(), got.column("label").to_pylist()))
    summary = examples_summary(tmp_path / "ex" / "train", LABELS, PERSP, probe_rows=8)
    assert summary["rows"] == 40 and summary["pairs_with_targets"] == int((expect_mask.sum(1) > 0).sum())
    probe = pq.read_table(tmp_path / "ex" / "train.probe.parquet")
    assert probe.num_rows == 8 and (column_matrix(probe, "target_mask").sum(1) > 0).all()


def test_fidelity_against_the_trivial_predictor():
    """A student whose projections are the teacher's embeddings beats the mean-target predictor; one that answers
    the mean itself gains exactly 0; average mode compares the one projection with the mean target."""
    from student.evaluate import fidelity_rows, fidelity_summary

    def fidelity(projected, targets, target_mask, train_targets, train_mask, mode, perspectives):
        if mode == "average":  # the trivial answer: the mean over training pairs of their mean target
            m = train_mask[..., None]
            mean = (train_targets * m).sum(1) / np.maximum(m.sum(1), 1)
            trivial = mean[train_mask.sum(1) > 0].mean(0, keepdims=True)
        else:  # each perspective's mean training target (every perspective has some here)
            trivial = np.stack([train_targets[train_mask[:, k] > 0, k].mean(0) for k in range(train_targets.shape[1])])
        s, t, has = fidelity_rows(projected, targets, target_mask, trivial, mode)
        return fidelity_summary(s, t, has, ["average"] if mode == "average" else perspectives)

    pairs = esci(40)
    ex = examples_table(pairs, LABELS, PERSP, fake_targets(pairs), target_dim=8)
    t, m = column_matrix(ex, "targets").reshape(40, 3, 8), column_matrix(ex, "target_mask")
    train_t, train_m = t[:30], m[:30]
    val_t, val_m = t[30:], m[30:].copy()
    val_m[0, 1] = 0  # a perspective without a target is skipped
    perfect = fidelity(val_t, val_t, val_m, train_t, train_m, "unified", PERSP)
    assert perfect["user_intent"]["student_cos"] == pytest.approx(1.0) and perfect["mean_gain"] > 0.05
    assert perfect["structured_analysis"]["n"] == 9 and perfect["user_intent"]["n"] == 10
    mean = np.broadcast_to(train_t.mean(0, keepdims=True), val_t.shape)
    assert fidelity(mean, val_t, val_m, train_t, train_m, "multi_teacher", PERSP)["mean_gain"] == pytest.approx(0, abs=1e-6)
    avg = fidelity(val_t.mean(1, keepdims=True), val_t, val_m, train_t, train_m, "average", PERSP)
    assert list(avg) == ["average", "mean_gain"]


def test_ndcg_ranks_by_score_with_graded_gains():
    from student.evaluate import ndcg_at_k

    gains = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
    q = ["a"] * 3 + ["b"] * 2 + ["c"] * 2
    g = np.array([gains[x] for x in ["E", "S", "I", "I", "S", "I", "I"]])
    perfect = ndcg_at_k(q, g, np.array([0.9, 0.5, 0.1, 0.2, 0.8, 0.3, 0.1]))
    assert perfect == {"ndcg@10": pytest.approx(1.0), "queries": 2, "queries_without_relevant": 1}
    swapped = ndcg_at_k(q, g, np.array([0.5, 0.9, 0.1, 0.2, 0.8, 0.3, 0.1]))  # query a: S above E
    dcg = 0.1 + 1.0 / np.log2(3)
    ideal = 1.0 + 0.1 / np.log2(3)
    assert swapped["ndcg@10"] == pytest.approx((dcg / ideal + 1.0) / 2)
    # only the top 10 count
    many = ndcg_at_k(["q"] * 11, np.array([0.0] * 10 + [1.0]), -np.arange(11.0))
    assert many["ndcg@10"] == 0.0


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """An untrained tiny LRKD student folder (poly, unified) with centroids: enough to score with."""
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import TINY_BERT, resolve_model

    encoder = resolve_model(TINY_BERT)
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(encoder, StudentConfig(labels=LABELS, perspectives=PERSP, target_dim=8, max_length=64))
    model.centroids.copy_(torch.randn(3, 8))
    out = tmp_path_factory.mktemp("student") / "best"
    model.save_pretrained(out, tokenizer=AutoTokenizer.from_pretrained(encoder))
    return out


@pytest.mark.ray
@pytest.mark.parametrize("one_task_bytes", [0, None], ids=["actor-pool", "one-task"])
def test_score_writes_resumable_parts_and_ranking_metrics(tmp_path, ray_local, tiny_student, monkeypatch, one_task_bytes):
    """`thinkbroad score` on a labelled JSONL file: one row per pair, the probabilities sum to 1, metrics with
    nDCG@10; a part removed after a kill is all that is scored again (the other parts are resumed, not rescored);
    an unlabelled file gets no metrics. Both ways: the Ray Data actor pool (large inputs) and one Ray task (small)."""
    import student.score
    from student.model import LRKDStudent
    from student.predict import predict

    if one_task_bytes is not None:
        monkeypatch.setattr(student.score, "ONE_TASK_BYTES", one_task_bytes)
    small = student.score.ScoreConfig(batch_size=32)
    monkeypatch.setattr(student.score, "ScoreConfig", lambda: small)  # batches of 32 ...
    monkeypatch.setattr(student.score, "PART_ROWS", 40)  # ... in several parts
    from workflows.stages.score import score_file

    rows = [json.loads(x) for x in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[:120]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.parquet"
    metrics = score_file(str(pairs), str(tiny_student), str(out), progress=False)
    got = pq.read_table(out)
    assert got.num_rows == 120 and sorted(got.column("pair_id").to_pylist()) == sorted(r["pair_id"] for r in rows)
    np.testing.assert_allclose(column_matrix(got, "probabilities").sum(1), 1.0, rtol=1e-5)
    assert set(got.column("dominant_perspective").to_pylist()) <= set(PERSP)
    assert metrics["n"] == 120 and 0 <= metrics["macro_f1"] <= 1 and metrics["ranking"]["queries"] > 0
    assert json.loads((out / "_metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    # the actors' labels are what the model predicts for these pairs in this process
    from transformers import AutoTokenizer

    from student.data import pair_rows
    from pairs.config import ColumnMap
    from pairs.scan import load_pairs

    table = pair_rows(load_pairs(pairs, "auto", ColumnMap(), LABELS), LABELS)
    model = LRKDStudent.from_pretrained(tiny_student)
    local = predict(model, table, AutoTokenizer.from_pretrained(tiny_student), 64)["probs"].argmax(-1).tolist()
    by_id = dict(zip(got.column("pair_id").to_pylist(), got.column("label").to_pylist()))
    assert [by_id[p] for p in table.column("pair_id").to_pylist()] == [LABELS[i] for i in local]

    again = score_file(str(pairs), str(tiny_student), str(out), progress=False)  # up to date: nothing rescored
    assert again == json.loads(json.dumps(metrics))
    (out / "_manifest.json").unlink()  # as a kill before the last write would leave it
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 2
    lost = pq.ParquetFile(parts[0]).metadata.num_rows
    parts[0].unlink()
    resumed = score_file(str(pairs), str(tiny_student), str(out), progress=False)
    assert resumed["accuracy"] == metrics["accuracy"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["scored_now"] == lost and manifest["reused"] == 120 - lost

    unlabelled = tmp_path / "new.jsonl"
    unlabelled.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n" for r in rows[:10]))
    m = score_file(str(unlabelled), str(tiny_student), str(tmp_path / "new.parquet"), progress=False)
    assert m == {"scored": 10, "unlabelled": 10}
    assert pq.read_table(tmp_path / "new.parquet").column("gold").null_count == 10


def test_score_cli_names_a_missing_student(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "workflows.cli", "score", str(ROOT / "data" / "esci_us_subset.jsonl"),
                          "--student", str(tmp_path / "nothing"), "--output", str(tmp_path / "o.parquet")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "is neither a student folder" in res.stderr and str(tmp_path / "nothing") in res.stderr


def test_training_workers_score_their_share_and_the_parts_do_not_depend_on_the_worker_count(tmp_path, tiny_student):
    """A distill run's students are scored by the workers that trained them (student/score.py score_on_worker):
    each rank writes the batches that are its share, every pair once over the ranks, with the very bytes one worker
    writes alone; fidelity columns where the rows carry targets; scored.json once done."""
    import shutil

    from student.data import examples_table
    from student.score import SCORED, score_on_worker

    pairs = esci(70)
    source = _write(examples_table(pairs, LABELS, PERSP, fake_targets(pairs), target_dim=8), tmp_path / "val", parts=3)
    student = tmp_path / "student"
    shutil.copytree(tiny_student, student / "best")

    def run(world):
        out = tmp_path / f"scored-{world}"
        job = {"out_dir": str(student), "score": {"outputs": {str(source): str(out)}, "trivial": np.zeros((3, 8)).tolist(),
                                                  "keep": None, "batch_size": 16}}
        for rank in range(world):  # one after another: no process group, as a one-worker run has none
            score_on_worker(job, rank, world, "cpu")
        return out

    alone, shared = run(1), run(2)
    files = sorted(p.name for p in alone.glob("part-*.parquet"))
    assert files == sorted(p.name for p in shared.glob("part-*.parquet")) and len(files) == 6  # 24 rows a file: 16 + 8
    for name in files:
        assert pq.read_table(alone / name).equals(pq.read_table(shared / name)), name
    got = pq.read_table(shared)
    assert sorted(got.column("pair_id").to_pylist()) == sorted(p["pair_id"] for p in pairs)
    assert {"student_cos", "trivial_cos", "has_target"} <= set(got.column_names)
    assert json.loads((student / SCORED).read_text()) == {"rows": {str(source): 70}, "workers": 2}
