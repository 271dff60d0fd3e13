"""One seed, one student: the epoch stream is a pure function of (files, seed, epoch, rank), a retrained student has
the same weights, and a student killed mid-epoch and resumed ends with the weights of an uninterrupted run."""
import hashlib
import json

import numpy as np
import pytest

from test_student_train import LABELS, PERSP, _write, esci, fake_targets


def _files(tmp_path, n=203, parts=5):
    from student.data import examples_table
    from pairs.parquet import parquet_files

    return parquet_files(_write(examples_table(esci(n), LABELS, PERSP), tmp_path / "ex", parts=parts))


def _ids(batches):
    return [t.column("pair_id").to_pylist() for t in batches]


def test_epoch_stream_is_a_function_of_seed_epoch_and_rank(tmp_path):
    from student.stream import EpochPlan, epoch_batches, text_lengths

    files = _files(tmp_path)
    plan = EpochPlan(batch_size=8, length_window=4, shuffle_rows=40)
    ranks = [_ids(epoch_batches(files, plan, seed=1, epoch=0, rank=r, world=2)) for r in range(2)]
    # every pair exactly once across the ranks, the ranks a batch apart at most
    seen = [p for r in ranks for b in r for p in b]
    assert sorted(seen) == sorted(p["pair_id"] for p in esci(203)) and len(seen) == 203
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1 and plan.steps(203, 2) == min(len(r) for r in ranks)
    assert plan.batches_in(203) == len(ranks[0]) + len(ranks[1])
    # the same arguments give the same batches; another epoch, seed or rank another order
    assert _ids(epoch_batches(files, plan, 1, 0, 0, 2)) == ranks[0]
    assert _ids(epoch_batches(files, plan, 1, 1, 0, 2)) != ranks[0]
    assert _ids(epoch_batches(files, plan, 2, 0, 0, 2)) != ranks[0]
    # a resumed epoch skips what it had done and goes on with the same batches
    assert _ids(epoch_batches(files, plan, 1, 0, 1, 2, skip=3)) == ranks[1][3:]
    # batches of similar text length: within a batch the spread is far below the epoch's
    lengths = [text_lengths(b) for b in epoch_batches(files, plan, 1, 0, 0, 2)]
    spread = np.mean([x.max() - x.min() for x in lengths if len(x) > 1])
    everything = np.concatenate(lengths)
    assert spread < 0.5 * (everything.max() - everything.min())


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    import torch

    from student import checkpoint as ckpt

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    ckpt.save(tmp_path, model, opt, {"epoch": 1, "step": 2})
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    state = ckpt.load(tmp_path)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(state["weights"])
    opt2 = torch.optim.AdamW(twin.parameters(), lr=0.1)
    ckpt.load_optimizer(opt2, state["optimizer"], state["param_groups"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight) and state["epoch"] == 1 and state["step"] == 2


def _digest(folder):
    return hashlib.sha256((folder / "best" / "model.safetensors").read_bytes()).hexdigest()


def _history(folder):
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in json.loads((folder / "history.json").read_text())]


@pytest.mark.ray
def test_retrained_and_resumed_students_have_identical_weights(tmp_path, ray_local):
    """Two Ray Train workers, the same seed and examples: a run killed mid-epoch (after a step checkpoint) and
    resumed in a new worker group ends with bit-identical best weights and the same history as an uninterrupted run:
    a retrain reproduces the student, and a resume is no other student."""
    from student.examples import PROBE, examples_summary
    from student.data import column_matrix, examples_table
    from student.train import StudentJob, StudentTrainConfig, TrainData, Variant, train_students
    from workflows.models import TINY_BERT, resolve_model

    encoder = resolve_model(TINY_BERT)
    train_pairs, val_pairs = esci(80), esci(32, offset=96)
    targets = fake_targets(train_pairs + val_pairs)
    train = examples_table(train_pairs, LABELS, PERSP, targets, target_dim=8)
    ex = tmp_path / "examples"
    _write(train, ex / "train", parts=3)
    _write(examples_table(val_pairs, LABELS, PERSP, targets, target_dim=8), ex / "val")
    summary = examples_summary(ex / "train", LABELS, PERSP, probe_rows=16)
    centroids = column_matrix(train, "targets").reshape(80, 3, 8).mean(0).tolist()
    data = TrainData(str(ex / "train"), str(ex / "val"), centroids, summary["label_counts"], 80, 8, str(ex / f"train.{PROBE}"))
    # 80 pairs, batches of 8 in chunks of 2: 10 batches, 5 steps per rank and epoch; a checkpoint every 2 steps
    settings = StudentTrainConfig(num_workers=2, epochs=2, batch_size=8, learning_rate=1e-3, patience=4, latent_dim=16,
                                  poly_codes=6, length_window=2, shuffle_buffer=24, checkpoint_steps=2)
    variant = Variant("lrkd-poly-unified", "lrkd", "poly", "unified", lam=0.5, seed=3)

    def run(name, crash_at=None):
        out = tmp_path / name
        train_students([StudentJob(variant, str(out), "d", key="k")], {"d": data}, settings, encoder, LABELS, PERSP,
                       tmp_path / f"{name}-ray", crash_at=crash_at)
        return out

    first = run("a")
    assert [h["steps"] for h in _history(first)] == [5, 5]
    # killed after global step 7 (epoch 1, step 2: its checkpoint holds the optimizer and data position), resumed
    with pytest.raises(Exception, match="injected fault"):
        run("c", crash_at=(1, 7))
    assert not (tmp_path / "c" / "trained.json").exists() and len(_history(tmp_path / "c")) == 1
    resumed = run("c")
    assert _digest(resumed) == _digest(first)
    assert _history(resumed) == _history(first)
