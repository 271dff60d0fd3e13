"""The MPCoT generation stage: tasks (pairs x perspectives x samples) are expanded from the split's Parquet in Arrow
batches, a Ray Data pool of actors holding `vllm.LLM` judges them, and the driver writes each finished batch as an
atomic Parquet part.

Resume: batch k is tasks [k*B, (k+1)*B) of a fixed order. A rerun keeps each part whose task ids (the only column
it reads) are its batch's and judges only the rest, so a run killed midway ends with exactly one row per (pair,
perspective, sample). The parts are consolidated, in task order, into a Parquet dataset (a folder of files) that the
stats, the SFT filter and conflict mining read in batches: the driver's memory does not grow with the task count.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mpcot.config import GenerationConfig
from mpcot.judge import JudgeSpec, VLLMJudge
from mpcot.placement import engine_kwargs, engine_placement
from mpcot.tasks import OUTPUT_SCHEMA, Tasks, num_tasks, task_batches
from pairs.parquet import FILE_ROWS, GROUP_ROWS, ParquetDatasetWriter, write_parquet_atomic


MAX_CHUNKS = 1000  # pending-task files per attempt: bounds the blocks Ray Data tracks in the driver
_PART = re.compile(r"batch-(\d+)\.parquet")


def part_path(parts_dir: Path, k: int) -> Path:
    """Batch k of the task order (tasks [k*B, (k+1)*B)) once judged."""
    return parts_dir / f"batch-{k:09d}.parquet"


@dataclass
class GenerationResult:
    rationales_path: str  # a Parquet dataset: a folder of part-NNNNN.parquet files, rows in task order
    rows: int
    generated_now: int
    reused: int
    seconds: float
    completion_tokens_now: int


def run_generation(tasks: Tasks, out_dir: str | Path, spec: JudgeSpec, gen: GenerationConfig,
                   progress: bool = True) -> GenerationResult:
    """Judge every task without a finished part in `out_dir/parts/`, then consolidate the parts, in task order, into
    the Parquet dataset `out_dir/rationales.parquet/`.

    `tasks`: a TaskPlan (pairs streamed from Parquet files; the driver never holds them all) or a table from
    `expand_tasks`. Ray must already be initialised (local or a cluster); on a multi-node cluster `out_dir` must be on
    storage every node mounts (the engine actors read the pending tasks from it).
    """
    return run_generations([GenerationJob(tasks, Path(out_dir), spec)], gen, progress)[0]


@dataclass
class GenerationJob:
    tasks: Tasks
    out_dir: Path
    spec: JudgeSpec  # the model and prompts


def run_generations(jobs: list[GenerationJob], gen: GenerationConfig, progress: bool = True) -> list[GenerationResult]:
    """run_generation for several jobs (e.g. one model each). Where the placement lets an engine actor switch models
    (`EnginePlacement.switches_models`: on CPU) the jobs share one pool of engine actors, each judging the jobs'
    batches in order and starting the next job's engine in its own process; else each job has its own pool."""
    import ray

    resources = ray.cluster_resources()
    place = engine_placement(gen.accelerator, resources.get("CPU", 1), resources.get("GPU", 0), gen.concurrency,
                             gen.cpus_per_engine, gen.gpus_per_engine, largest_node_cpus())
    groups = [list(range(len(jobs)))] if place.switches_models else [[i] for i in range(len(jobs))]
    results: dict[int, GenerationResult] = {}
    for group in groups:
        results.update(_run_pool([jobs[i] for i in group], group, gen, place, progress))
    return [results[i] for i in range(len(jobs))]


def _run_pool(jobs: list[GenerationJob], ids: list[int], gen: GenerationConfig, place, progress: bool) -> dict:
    """One Ray Data pool of engine actors over the pending batches of `jobs` (in job order) -> {id: result}."""
    import ray

    t0 = time.time()
    pending = []
    for job in jobs:
        parts_dir = job.out_dir / "parts"
        parts_dir.mkdir(parents=True, exist_ok=True)
        pending.append(scan_parts(job.tasks, parts_dir, gen.batch_size))
    generated, tokens = [0] * len(jobs), [0] * len(jobs)
    items = [{"path": str(c), "job": j} for j, p in enumerate(pending) for c in p.chunks]
    if items:
        specs = [JudgeSpec(**{**asdict(job.spec), "engine_kwargs": engine_kwargs(place, job.spec.engine_kwargs)}) for job in jobs]
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, ours, counting judged rows
        # the inputs are file names, not tasks: no Ray task needs a CPU before the engines (which take them all)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            VLLMJudge,
            fn_constructor_kwargs={"specs": specs},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=gen.concurrency),
            runtime_env={"env_vars": place.env} if place.env else None,
            **place.remote_args,
        )
        writers = [_PartWriter(job.out_dir / "parts", gen.batch_size, p.total) for job, p in zip(jobs, pending)]
        bar = _progress(sum(p.tasks for p in pending), sum(p.reused for p in pending), progress)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            of = block.column("job").to_numpy()
            for j in np.unique(of):
                rows = block.filter(pa.array(of == j)).drop_columns(["job"])
                writers[j].add(rows)
                generated[j] += rows.num_rows
                tokens[j] += pc.sum(rows.column("completion_tokens")).as_py() or 0
            if bar:
                bar.update(block.num_rows)
                bar.set_postfix(tok_s=f"{sum(tokens) / max(time.time() - t0, 1e-9):.0f}")
        if bar:
            bar.close()
    out = {}
    for i, job, p, n, k in zip(ids, jobs, pending, generated, tokens):
        shutil.rmtree(p.chunk_dir, ignore_errors=True)
        path = job.out_dir / "rationales.parquet"
        consolidate(job.out_dir / "parts", p.total, gen.batch_size, path)
        out[i] = GenerationResult(str(path), p.total, n, p.reused, time.time() - t0, k)  # the pool's seconds
    return out


def largest_node_cpus() -> float:
    """The CPUs of the biggest alive node of the connected Ray cluster."""
    import ray

    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"mpcot generate ({done} reused)", unit="row", dynamic_ncols=True)


@dataclass
class PendingTasks:
    total: int  # tasks in the order
    tasks: int  # of them without a finished part
    reused: int  # of them judged by an earlier attempt
    chunk_dir: Path
    chunks: list[Path]  # the pending tasks, whole batches in order, for the engine actors


def scan_parts(tasks: Tasks, parts_dir: Path, batch_size: int, max_chunks: int = MAX_CHUNKS) -> PendingTasks:
    """The resume check, one batch at a time: batch k is done when parts/batch-k.parquet holds exactly its task ids
    (only that column is read); a part that does not is deleted. The pending batches go, in order, into at most
    about `max_chunks` files under parts/.tasks/."""
    total = num_tasks(tasks)
    n_batches = math.ceil(total / batch_size)
    have = np.zeros(n_batches, dtype=bool)
    stale = 0
    for entry in os.scandir(parts_dir):
        m = _PART.fullmatch(entry.name)
        if m and int(m[1]) < n_batches:
            have[int(m[1])] = True
        elif m:
            os.unlink(entry.path)
            stale += 1
    chunk_dir = parts_dir / ".tasks"
    shutil.rmtree(chunk_dir, ignore_errors=True)
    chunk_dir.mkdir(parents=True)
    per_chunk = max(1, math.ceil((n_batches - int(have.sum())) / max_chunks))
    held: list[pa.Table] = []
    chunks: list[Path] = []
    pending = reused = 0

    def flush():
        chunks.append(chunk_dir / f"chunk-{len(chunks):06d}.parquet")
        pq.write_table(pa.concat_tables(held), chunks[-1])
        held.clear()

    for k, batch in enumerate(task_batches(tasks, batch_size)):
        if have[k]:
            part = part_path(parts_dir, k)
            try:
                same = pq.read_table(part, columns=["task_id"]).column("task_id").equals(batch.column("task_id"))
            except (OSError, pa.ArrowException):
                same = False
            if same:
                reused += batch.num_rows
                continue
            part.unlink()
            stale += 1
        held.append(batch)
        pending += batch.num_rows
        if len(held) == per_chunk:
            flush()
    if held:
        flush()
    if stale:
        print(f"[thinkbroad] generation: {stale} part(s) in {parts_dir} did not match the tasks; judging those again",
              flush=True)
    return PendingTasks(total, pending, reused, chunk_dir, chunks)


class _PartWriter:
    """Writes judged rows as parts/batch-k.parquet once all of batch k has arrived (Ray Data may merge the actors'
    outputs into one block, or split one)."""

    def __init__(self, parts_dir: Path, batch_size: int, total: int):
        self.parts_dir, self.size, self.total = parts_dir, batch_size, total
        self.held: dict[int, list[pa.Table]] = {}

    def add(self, block: pa.Table) -> None:
        k_of = block.column("task_index").to_numpy() // self.size
        starts = [0, *(np.flatnonzero(np.diff(k_of)) + 1).tolist(), len(k_of)]
        for a, b in zip(starts, starts[1:]):
            k = int(k_of[a])
            self.held.setdefault(k, []).append(block.slice(a, b - a))
            rows = pa.concat_tables(self.held[k])
            # first row per task: a task Ray ran twice (a retried actor call) is written once
            index, first = np.unique(rows.column("task_index").to_numpy(), return_index=True)
            if len(index) == min(self.size, self.total - k * self.size):
                write_parquet_atomic(rows.take(pa.array(first)), part_path(self.parts_dir, k))
                del self.held[k]


def consolidate(parts_dir: Path, total: int, batch_size: int, out_path: Path, file_rows: int = FILE_ROWS) -> None:
    """parts/batch-*.parquet -> the dataset `out_path/` (files of `file_rows` rows, in task order), streamed one part
    at a time and swapped in whole."""
    n_batches = math.ceil(total / batch_size)
    missing = sum(min(batch_size, total - k * batch_size) for k in range(n_batches) if not part_path(parts_dir, k).exists())
    if missing:
        raise RuntimeError(f"{missing} of {total} tasks have no output in {parts_dir}; rerun to generate them")
    tmp = out_path.with_name(f".{out_path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with ParquetDatasetWriter(tmp, OUTPUT_SCHEMA, file_rows, min(GROUP_ROWS, file_rows)) as sink:
        for k in range(n_batches):
            part = pq.read_table(part_path(parts_dir, k))
            index = part.column("task_index")
            if part.num_rows != min(batch_size, total - k * batch_size) or index[0].as_py() != k * batch_size:
                raise RuntimeError(f"{part_path(parts_dir, k)} does not hold batch {k} of the tasks; delete it and rerun")
            sink.write(part.select(OUTPUT_SCHEMA.names))
    if out_path.is_dir():
        shutil.rmtree(out_path)
    elif out_path.exists():
        out_path.unlink()  # a single-file rationales.parquet of an older version
    os.replace(tmp, out_path)


