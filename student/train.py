"""LRKD student training on Ray Train (`TorchTrainer`, DDP across N workers), with early stopping on validation
macro-F1, checkpoints of the whole training state, and the best model exported as a student folder.
This module holds the settings and starts the jobs (`train_students`); the loop each worker runs is
student/worker.py.

One seed, one student: each worker streams the examples' Parquet files (student/data.py's columns; Ray Data built
them) in an order that is a pure function of (seed, epoch, rank) (student/stream.py): files and shuffle windows
permuted per epoch, batches of similar text length inside each chunk of `length_window` batches, batch g dealt to
rank g % world. Dropout is seeded per (seed, epoch, step, rank), the thread count is fixed per worker, and the
gloo/NCCL all-reduce sums the same tensors in the same order, so a rerun gives the same weights. `train_loop_config`
carries settings and paths only. Validation is split across the workers by a hash of the pair id and gathered.

Checkpoints (every `checkpoint_steps` steps and at each epoch's end) hold the weights, the optimizer's state, the
epoch and step reached and the epoch's running sums (student/checkpoint.py, no pickle): a killed run resumed from
one ends with the weights of an uninterrupted run.

Several students train one after another in one worker group (`train_students`, since starting a group costs
~20 s); its Ray Train state and latest checkpoint (which job and key it belongs to) live in the `storage` folder
given. Each student's folder (`out_dir`):
  trained.json  written when its training finished (early stop or last epoch)
  best/     the best epoch's student folder (student_config.json, model.safetensors, tokenizer),
            selection.json (that epoch and its val macro-F1) and val_logits.parquet (pair_id, the logits it was
            chosen on)
  history.json  per-epoch train loss parts, validation macro-F1, and the guidance diagnostics: CE, guidance,
                lambda * guidance / CE and the ratio of the guidance term's gradient norm to CE's on the encoder
                (and timings, which differ run to run)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

TRAINED = "trained.json"
VAL_LOGITS = "val_logits.parquet"


class StudentTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="CPU training: cores (threads) per worker")
    accelerator: str = Field("auto", pattern="^(auto|cpu|gpu)$")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate of the pretrained encoder")
    head_learning_rate: float = Field(1e-3, gt=0, description="peak learning rate of the new parts: extractor, "
                                      "classifier, projections (they start from random)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warm-up over this share of the steps, then linear decay to 0")
    weight_decay: float = Field(0.01, ge=0)
    max_length: int = Field(128, ge=8)
    segment_ids: bool = Field(True, description="hand the tokenizer's token_type_ids (query 0, product 1) to encoders "
                              "that take them; false = every token in segment 0, as students trained before 2026-12-06")
    class_weighting: str = Field("inverse_frequency", pattern="^(none|inverse_frequency)$")
    patience: int = Field(2, ge=1, description="stop after this many epochs without a better val macro-F1")
    latent_dim: int = Field(256, ge=1)
    poly_codes: int = Field(16, ge=1)
    kd_temperature: float = Field(1.0, gt=0)
    guidance: str = Field("l2", pattern="^(l2|cosine)$", description="latent term: squared L2 summed over dimensions, or 1 - cos")
    length_window: int = Field(32, ge=1, description="batches per chunk sorted by token length (less padding); 1 = no grouping")
    shuffle_buffer: int = Field(4096, ge=1, description="rows in each shuffle window (at least one chunk); the files' order "
                                "is shuffled too, every epoch (student/stream.py)")
    checkpoint_steps: int = Field(500, ge=0, description="a mid-epoch checkpoint every this many steps (resume loses at "
                                  "most these); 0 = at each epoch's end only")


@dataclass
class Variant:
    """One student to train: `kind` vanilla | logit_kd | lrkd. `target_source` (teacher | gold_conditioned |
    label_text) and `target_perspectives` (a subset, None = all) say which targets its guidance term reads; the
    stage hands the training loop those targets (the others masked)."""

    name: str
    kind: str
    extractor: str = "none"
    mode: str = "average"
    lam: float = 0.0
    kd_alpha: float = 0.0
    seed: int = 0
    target_source: str | None = None
    target_perspectives: list[str] | None = None


def _device(accelerator: str) -> str:
    import ray

    if accelerator == "auto":
        return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return accelerator


def perspective_mask(kept: list[str] | None, perspectives: list[str]) -> np.ndarray:
    """1 for the perspectives whose targets a variant reads (all when `kept` is None; one for a single-perspective
    variant), 0 for the others: multiplied into target_mask in training and in fidelity scoring."""
    return np.array([float(kept is None or p in kept) for p in perspectives], np.float32)


@dataclass
class TrainData:
    """The examples a job trains on: `train` and `val` examples datasets (Parquet folders, student/data.py's
    columns), the per-perspective centroids of the train targets (attribution at inference), the train label
    counts (class weights), the rows of `train`, the target width, and `probe`: a small Parquet file whose first
    batch is the guidance diagnostics' batch."""

    train: str
    val: str
    centroids: list
    label_counts: list[int]
    rows: int
    target_dim: int
    probe: str


@dataclass
class StudentJob:
    """One student for `train_students`: the variant, its output folder, and the key of its data in `datasets`."""

    variant: Variant
    out_dir: str
    data: str
    key: str = ""  # what the student depends on (config and input fingerprints): a checkpoint of another key is not resumed
    score: dict | None = None  # scored by the workers once trained: see student/score.py score_on_worker


def _finished(job: StudentJob) -> bool:
    from student.score import SCORED

    out = Path(job.out_dir)
    return (out / TRAINED).exists() and (job.score is None or (out / SCORED).exists())


def train_students(jobs: list[StudentJob], datasets: dict[str, TrainData], settings: StudentTrainConfig,
                   encoder_path: str, labels: list[str], perspectives: list[str], storage: str | Path,
                   crash_at: tuple[int, int] | None = None) -> None:
    """Train the jobs one after another in one Ray Train worker group (DDP over `settings.num_workers`), each
    worker streaming `datasets[job.data]`'s Parquet files in the order student/stream.py derives from
    (seed, epoch, rank).

    A job with `score` is then scored by the same workers (student/score.py score_on_worker). A job whose folder
    has trained.json (and scored.json, when it is to be scored) is skipped; rerunning the same jobs with the same `storage` resumes the
    interrupted one where its last checkpoint stood (every `checkpoint_steps` steps and at each epoch's end), and
    ends with the weights an uninterrupted run gives. `crash_at` (job index from 1, global step): a test's injected
    fault, raised after that step's checkpoint."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from student.worker import train_loop

    if all(_finished(j) for j in jobs):
        return
    for j in jobs:
        Path(j.out_dir).mkdir(parents=True, exist_ok=True)
    device = _device(settings.accelerator)
    # every worker streams the examples' Parquet files itself (student/stream.py): the trainer gets paths, no datasets
    data = {key: asdict(datasets[key]) | {"train": str(Path(datasets[key].train).resolve()),
                                          "val": str(Path(datasets[key].val).resolve()),
                                          "probe": str(Path(datasets[key].probe).resolve())}
            for key in sorted({j.data for j in jobs})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=train_loop_config(jobs, data, settings, encoder_path, labels, perspectives) | {"crash_at": list(crash_at) if crash_at else None},
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=device == "gpu",
                                     resources_per_worker=None if device == "gpu" else {"CPU": settings.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if device == "gpu" else "gloo"),
        run_config=RunConfig(name="students", storage_path=str(Path(storage).resolve()), checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


def train_loop_config(jobs: list[StudentJob], data: dict, settings: StudentTrainConfig, encoder_path: str,
                      labels: list[str], perspectives: list[str]) -> dict:
    """What each training worker is given: settings, paths and the names of its Ray datasets; never the data."""
    return {
        "jobs": [{"variant": asdict(j.variant), "out_dir": str(Path(j.out_dir).resolve()), "data": j.data, "index": i,
                  "key": j.key, "score": j.score}
                 for i, j in enumerate(jobs, 1)],
        "data": data, "settings": settings.model_dump(), "encoder_path": str(Path(encoder_path).resolve()),
        "labels": labels, "perspectives": perspectives,
    }


def train_student(variant: Variant, settings: StudentTrainConfig, data: TrainData, encoder_path: str,
                  labels: list[str], perspectives: list[str], out_dir: str | Path) -> list[dict]:
    """Train one variant into out_dir (rerunning resumes it). Returns the per-epoch history."""
    out = Path(out_dir)
    train_students([StudentJob(variant, str(out), "data")], {"data": data}, settings, encoder_path, labels, perspectives,
                   out / "ray")
    return json.loads((out / "history.json").read_text())
