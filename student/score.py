"""Scoring pairs with a trained student on Ray Data workers: an actor pool holds the student (a GPU each when the
cluster has GPUs), the driver only writes the small per-pair results as Parquet parts and reads metrics back; and
in the Ray Train workers that trained a distill run's students (score_on_worker).

Output rows (one per pair): pair_id, query_id, gold (the pair's label, null when unlabelled), label (predicted),
probabilities (fixed_size_list<float32>[C], in label order), score (expected relevance on the ordered labels,
best = 1: what a search ranking sorts by), dominant_perspective (the perspective whose centroid the latent is
closest to; null for a student without an extractor). With teacher targets in the input (validation), also
student_cos / trivial_cos / has_target (fixed lists, one per projection head): latent fidelity, per pair.

Resume: every finished part is kept; a rerun scores only the pairs no part holds (their ids are read, nothing else).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

PART_ROWS = 50_000  # rows per written part: a kill loses at most this much scoring


class ScoreConfig(BaseModel):
    """How pairs are scored: `thinkbroad score` and `thinkbroad eval` on Ray Data actors; a distill run's students are
    scored by the Ray Train workers that trained them, `batch_size` rows at a time."""

    model_config = ConfigDict(extra="forbid")

    actors: int | None = Field(None, ge=1, description="scoring actors; null = one per GPU, else one per "
                               "`cpus_per_actor` CPUs of the cluster")
    cpus_per_actor: int = Field(1, ge=1, description="CPU scoring: cores (threads) per actor")
    batch_size: int = Field(256, ge=1, description="pairs per Ray Data batch (each actor sorts a batch by length)")
    accelerator: str = Field("auto", pattern="^(auto|cpu|gpu)$")


def placement(score: ScoreConfig, resources: dict) -> tuple[int, dict, bool]:
    """(actors, ray remote args of each, light reads) for the scoring pool: one GPU per actor where the cluster has
    GPUs (and accelerator allows; the reads use the node's CPUs), else `cpus_per_actor` CPUs each, all the
    cluster's CPUs, with reads that take no CPU slot (student.examples.read_parquet). The one place that tells GPU
    scoring from CPU scoring."""
    gpus = resources.get("GPU", 0) if score.accelerator != "cpu" else 0
    if score.accelerator == "gpu" and not gpus:
        raise RuntimeError("distill.score.accelerator is gpu but the Ray cluster has no GPUs; set it to auto or cpu")
    if gpus:
        return score.actors or max(1, int(gpus)), {"num_gpus": 1, "num_cpus": 1}, False
    cpus = max(1, int(resources.get("CPU", 1)))
    return min(score.actors or cpus // score.cpus_per_actor, cpus) or 1, {"num_cpus": score.cpus_per_actor}, True


class StudentPredictor:
    """A Ray Data actor: holds a student folder's model (fp32; on its GPU when it has one) and scores batches of
    canonical pairs (pairs/canonical.py's columns) or examples rows (student/data.py's; with targets, fidelity too).

    trivial: the trivial predictor's answer per projection head (each perspective's mean training target), for
    fidelity."""

    def __init__(self, student_dir: str, batch_size: int = 64, trivial: list | None = None, keep: list[str] | None = None,
                 device: str | None = None):
        import torch
        from transformers import AutoTokenizer

        from student.model import LRKDStudent

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = LRKDStudent.from_pretrained(student_dir, device=self.device)
        self.tok = AutoTokenizer.from_pretrained(student_dir)
        self.cfg = self.model.cfg
        self.batch_size = batch_size
        self.trivial = None if trivial is None else np.asarray(trivial, np.float32)
        from student.train import perspective_mask

        self.keep = perspective_mask(keep, self.cfg.perspectives)  # the targets a single-perspective variant read
        n = len(self.cfg.labels)
        self.grades = np.array([1 - i / max(n - 1, 1) for i in range(n)], np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from student.data import column_matrix, fixed_list, pair_rows
        from student.evaluate import fidelity_rows
        from student.predict import predict

        if "product" not in batch.column_names:
            batch = pair_rows(batch, self.cfg.labels)
        out = predict(self.model, batch, self.tok, self.cfg.max_length, self.batch_size, self.device)
        probs = out["probs"].numpy()
        labels, persp = np.array(self.cfg.labels, dtype=object), self.cfg.perspectives
        gold = batch.column("label").to_numpy()
        cols = {
            "pair_id": batch.column("pair_id"), "query_id": batch.column("query_id"),
            "gold": pa.array([labels[g] if g >= 0 else None for g in gold], pa.string()),
            "label": pa.array(labels[probs.argmax(-1)].tolist(), pa.string()),
            "probabilities": fixed_list(probs.astype(np.float32), probs.shape[1]),
            "score": pa.array(probs @ self.grades, pa.float32()),
            "dominant_perspective": pa.array([persp[i] for i in out["perspective_scores"].argmax(-1).tolist()]
                                             if out["perspective_scores"] is not None else [None] * batch.num_rows, pa.string()),
        }
        if self.trivial is not None and out["projected"] is not None and "targets" in batch.column_names:
            k = len(persp)
            targets = column_matrix(batch, "targets").reshape(batch.num_rows, k, -1)
            mask = column_matrix(batch, "target_mask") * self.keep
            s, t, has = fidelity_rows(out["projected"].numpy(), targets, mask, self.trivial, self.cfg.mode)
            has &= np.linalg.norm(self.trivial, axis=-1)[None, :] > 0
            heads = s.shape[1]
            cols |= {"student_cos": fixed_list(s.astype(np.float32), heads), "trivial_cos": fixed_list(t.astype(np.float32), heads),
                     "has_target": fixed_list(has.astype(np.float32), heads)}
        return pa.table(cols)


SCORED = "scored.json"  # in a student folder: its validation and test predictions are complete


def score_on_worker(job: dict, rank: int, world: int, device) -> None:
    """In the Ray Train workers that trained a student (student/worker.py), right after: each source of
    `job["score"]` (a Parquet file or folder: its files in name order, read `batch_size` rows at a time) scored by
    the job's best model into that source's folder as part-<batch>.parquet. Batch b is rank b mod world's, so the
    parts are the same whatever the worker count. No actor to start and no model to load in another process: the
    workers already hold torch, the tokenizer and the device (a GPU each on a cluster).

    `job["score"]`: {"outputs": {source: folder}, "trivial": the trivial predictor or None, "keep": the
    perspectives kept or None, "batch_size": rows per batch}. Rank 0 empties the folders first (a student is
    scored whole or again) and writes SCORED in the student folder once every rank has finished."""
    import torch
    import torch.distributed as dist

    from pairs.parquet import parquet_files, read_rows

    spec, out = job["score"], Path(job["out_dir"])

    def barrier() -> None:  # an all-reduce on the worker's own device (a plain barrier on NCCL guesses the GPU)
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(torch.zeros(1, device=device))

    if rank == 0:
        for folder in spec["outputs"].values():
            shutil.rmtree(folder, ignore_errors=True)
            Path(folder).mkdir(parents=True)
    barrier()
    predictor = StudentPredictor(str(out / "best"), spec["batch_size"], spec["trivial"], spec["keep"], device=str(device))
    counts = {}
    for source, folder in spec["outputs"].items():
        rows = 0
        for b, batch in enumerate(read_rows(parquet_files(source), batch_rows=spec["batch_size"])):
            rows += batch.num_rows
            if b % world == rank and batch.num_rows:
                _write_part(predictor(batch), Path(folder) / f"part-{b:05d}.parquet")
        counts[source] = rows
    barrier()
    if rank == 0:
        (out / SCORED).write_text(json.dumps({"rows": counts, "workers": world}))


@dataclass
class ScoreResult:
    path: str
    rows: int
    scored_now: int
    reused: int
    seconds: float


def finished_pair_ids(out_dir: Path) -> pa.Array:
    """The pair ids every finished part holds (only that column is read)."""
    parts = sorted(out_dir.glob("part-*.parquet"))
    if not parts:
        return pa.array([], pa.string())
    return pa.concat_arrays([c for p in parts for c in pq.read_table(p, columns=["pair_id"]).column("pair_id").chunks]
                            or [pa.array([], pa.string())])


def _pending(batch: pa.Table, done_ref) -> pa.Table:
    import ray

    done = ray.get(done_ref)
    return batch.filter(pc.invert(pc.is_in(batch.column("pair_id"), value_set=done)))


def score_dataset(source: str | Path, student_dir: str | Path, out_dir: str | Path, settings: ScoreConfig,
                  total: int | None = None, trivial: list | None = None, progress: bool = True, what: str = "score",
                  keep: list[str] | None = None) -> ScoreResult:
    """Score every row of the Parquet file or folder `source` (canonical pairs or examples rows) into
    `out_dir/part-*.parquet`, skipping the pairs finished parts already hold. Ray must be initialised."""
    import ray

    from student.examples import input_bytes, read_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    actors, remote, light = placement(settings, ray.cluster_resources())
    done = finished_pair_ids(out_dir)
    reused = len(done)
    attempt = uuid.uuid4().hex[:8]
    if input_bytes([source]) <= ONE_TASK_BYTES:  # one Ray task: no actor pool to start for what one process scores
        task = ray.remote(**remote)(_score_in_one_task)
        written = ray.get(task.remote(str(Path(source).resolve()), str(Path(student_dir).resolve()), str(out_dir.resolve()),
                                      settings.batch_size, trivial, keep, done, attempt, PART_ROWS))
        if progress:
            print(f"{what}: {written} pairs scored in one task ({reused} reused)", flush=True)
        return ScoreResult(str(out_dir), reused + written, written, reused, time.time() - t0)
    ds = read_parquet(source, light, actors)
    if reused:
        ref = ray.put(done)
        ds = ds.map_batches(_pending, fn_kwargs={"done_ref": ref}, batch_format="pyarrow", batch_size=None,
                            **({"num_cpus": 0} if light else {}))
    scored = ds.map_batches(StudentPredictor, fn_constructor_kwargs={"student_dir": str(Path(student_dir).resolve()),
                                                                     "trivial": trivial, "keep": keep},
                            batch_size=settings.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=actors), **remote)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if total is None else max(total - reused, 0), desc=f"{what} ({reused} reused)", unit="pair",
                   dynamic_ncols=True)
    parts = _Parts(out_dir, attempt, PART_ROWS)
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts.add(batch)
        if bar:
            bar.update(batch.num_rows)
    written = parts.close()
    if bar:
        bar.close()
    return ScoreResult(str(out_dir), reused + written, written, reused, time.time() - t0)


class _Parts:
    """Scored rows into out_dir/part-<attempt>-<n>.parquet, `part_rows` at a time (a kill loses at most one part)."""

    def __init__(self, out_dir: str | Path, attempt: str, part_rows: int):
        self.out_dir, self.attempt, self.part_rows = Path(out_dir), attempt, part_rows
        self.pending, self.rows, self.written, self.n = [], 0, 0, 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= self.part_rows:
            self._flush()

    def _flush(self) -> None:
        _write_part(pa.concat_tables(self.pending), self.out_dir / f"part-{self.attempt}-{self.n:05d}.parquet")
        self.written, self.pending, self.rows, self.n = self.written + self.rows, [], 0, self.n + 1

    def close(self) -> int:
        """Writes what is pending; returns the rows written."""
        if self.pending:
            self._flush()
        return self.written


# A source up to this many bytes of Parquet (a few thousand pairs) is scored in one Ray task, whose worker process
# Ray keeps for the next: a pool of scoring actors costs ~10 s to start on 2 cores, about what one task loses against
# the pool's parallelism on a few thousand pairs of a MiniLM student.
ONE_TASK_BYTES = 1 << 20


def _score_in_one_task(source: str, student_dir: str, out_dir: str, batch_size: int, trivial: list | None,
                       keep: list[str] | None, done: pa.Array, attempt: str, part_rows: int) -> int:
    """score_dataset's path for a small source, in one Ray task: the rows no finished part holds, `batch_size` at a
    time, into parts of `part_rows` named as the actor pool names them. Returns the rows scored."""
    from pairs.parquet import parquet_files, read_rows

    predictor, parts = StudentPredictor(student_dir, batch_size, trivial, keep), _Parts(out_dir, attempt, part_rows)
    for batch in read_rows(parquet_files(source), batch_rows=batch_size):
        if len(done):
            batch = batch.filter(pc.invert(pc.is_in(batch.column("pair_id"), value_set=done)))
        if batch.num_rows:
            parts.add(predictor(batch))
    return parts.close()


def _write_part(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def gains_of(labels: list) -> dict[str, float]:
    """Each label's gain in nDCG: its configured `gain`, else the linear grade (best 1, worst 0)."""
    n = len(labels)
    out = {}
    for i, lab in enumerate(labels):
        gain = getattr(lab, "gain", None)
        out[getattr(lab, "name", lab)] = float(gain) if gain is not None else 1 - i / max(n - 1, 1)
    return out


def metrics_from_parts(out_dir: str | Path, labels: list[str], perspectives: list[str], gains: dict[str, float],
                       order: pa.Array | str | Path | None = None, mode: str | None = None) -> dict:
    """Accuracy, macro-F1, per-class F1, confusion, attribution, nDCG@10 (ranked by score) and, when the parts have
    them, latent fidelity, over the labelled pairs of the scored parts. Reads only the small columns.

    order: pair ids (or a Parquet file whose pair_id column holds them); `predictions` then follows that order (the
    split's), and every pair of it must be scored."""
    from student.evaluate import classification_metrics, fidelity_summary, ndcg_at_k

    path = Path(out_dir)
    names = pq.read_schema(next(path.glob("part-*.parquet"))).names if any(path.glob("part-*.parquet")) else []
    cols = ["pair_id", "query_id", "gold", "label", "score", "dominant_perspective"]
    fid = [c for c in ("student_cos", "trivial_cos", "has_target") if c in names]
    t = pq.read_table(path, columns=cols + fid) if names else None
    if t is None or t.num_rows == 0:
        return {"n": 0}
    labelled = t.filter(pc.is_valid(t.column("gold")))
    result: dict = {"scored": t.num_rows, "unlabelled": t.num_rows - labelled.num_rows}
    if labelled.num_rows == 0:
        return result
    if isinstance(order, (str, Path)):  # a split file: its pair ids, read here (in the task, not the caller)
        order = pq.read_table(order, columns=["pair_id"]).column("pair_id").combine_chunks()
    if order is not None:  # joined on pair_id: the i-th prediction is the i-th pair's, or nothing is returned
        pos = pc.index_in(order, value_set=labelled.column("pair_id"))
        if pos.null_count or len(order) != labelled.num_rows:
            raise ValueError(f"{path}: {labelled.num_rows} scored labelled pairs where the split has {len(order)} "
                             f"({pos.null_count} of its pairs missing): paired comparisons would set predictions against "
                             "other pairs' gold labels; delete the folder and score again")
        labelled = labelled.take(pos)
    index = {c: i for i, c in enumerate(labels)}
    gold = np.array([index[g] for g in labelled.column("gold").to_pylist()])
    pred = np.array([index[g] for g in labelled.column("label").to_pylist()])
    pidx = {p: i for i, p in enumerate(perspectives)}
    dom = labelled.column("dominant_perspective").to_pylist()
    dominant = np.array([pidx.get(d, -1) if d is not None else -1 for d in dom])
    result |= classification_metrics(gold, pred, labels, perspectives, dominant)
    g = np.array([gains[lab] for lab in labelled.column("gold").to_pylist()])
    result["ranking"] = ndcg_at_k(labelled.column("query_id"), g, labelled.column("score").to_numpy())
    if fid:
        from student.data import column_matrix

        has = column_matrix(labelled, "has_target") > 0
        head_names = ["average"] if mode == "average" else list(perspectives)
        result["fidelity"] = fidelity_summary(column_matrix(labelled, "student_cos"), column_matrix(labelled, "trivial_cos"),
                                              has, head_names)
    return result


def aligned_predictions(out_dir: str | Path, order: pa.Array, labels: list[str]) -> np.ndarray:
    """The predicted label index of every pair of `order` (pair ids), read from a student's scored parts and joined
    on pair_id (only two columns are read). Raises when the parts do not hold exactly those pairs: a paired
    comparison must never set one pair's prediction against another pair's gold label."""
    t = pq.read_table(out_dir, columns=["pair_id", "label"])
    pos = pc.index_in(order, value_set=t.column("pair_id"))
    if pos.null_count or len(order) != t.num_rows:
        raise ValueError(f"{out_dir}: {t.num_rows} scored pairs where the split has {len(order)} ({pos.null_count} of "
                         "its pairs missing): paired comparisons would set predictions against other pairs' gold labels; "
                         "delete the folder and score again")
    index = {c: i for i, c in enumerate(labels)}
    return np.array([index[x] for x in t.column("label").take(pos).to_pylist()], np.int8)


def write_manifest(out_dir: Path, info: dict) -> None:
    """`_manifest.json` beside the parts (readers of the Parquet folder skip it)."""
    tmp = out_dir / f"._manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, out_dir / "_manifest.json")
