"""The MPCoT generation stage: tasks (pairs x perspectives x samples) are expanded from the split's Parquet in Arrow
batches, a Ray Data pool of actors holding `vllm.LLM` judges them, and the driver writes each finished batch as an
atomic Parquet part.

Resume: batch k is tasks [k*B, (k+1)*B) of a fixed order. A rerun keeps each part whose task ids (the only column
it reads) are its batch's and judges only the rest, so a run killed midway ends with exactly one row per (pair,
perspective, sample). The parts are consolidated, in task order, into a Parquet dataset (a folder of files) that the
stats, the SFT filter and conflict mining read in batches: the driver's memory does not grow with the task count.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from mpcot.labels import Label
from mpcot.parsing import ParsedJudgement, normalise_label, parse_output
from mpcot.perspectives import Perspective
from mpcot.placement import engine_kwargs, engine_placement
from mpcot.prompts import build_messages, format_completion, json_regex, prompt_hash, render_prompt


class GenerationConfig(BaseModel):
    """Everything about how the teacher is sampled. Lives in the `generation:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    # json: {"rationale", "label"} constrained by vLLM structured outputs, the label one of the label titles
    # choice: free rationale text, then a guided choice among the label titles after "Label: "
    # free_text: unconstrained; the label is parsed from a final "Label: X" line
    output_mode: Literal["json", "choice", "free_text"] = "json"
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])
    max_pairs: int | None = Field(None, ge=1, description="first N pairs of each split, null = all")
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, description="json mode: leave room for rationale_max_chars, or long answers are cut and fail to parse")
    repetition_penalty: float = Field(1.0, gt=0.0, description=">1 discourages the loops small greedy models fall into")
    rationale_max_chars: int = Field(400, ge=1, description="json mode: longest rationale allowed")
    max_attribute_chars: int = Field(300, ge=0, description="attribute text is cut to this length in prompts")
    batch_size: int = Field(32, ge=1, description="prompts per vLLM call; one Parquet part per batch")
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas (Ray actors)")
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    cpus_per_engine: int | None = Field(None, ge=1, description="CPU mode; null = the cluster's CPUs / concurrency")
    gpus_per_engine: int = Field(1, ge=1, description="GPU mode: tensor-parallel size of each engine")
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM(...) keyword arguments")


@dataclass(frozen=True)
class JudgeSpec:
    """What an engine actor needs; plain data so it pickles to any node."""

    model_path: str
    model_name: str
    labels: list[dict]
    perspectives: list[dict]
    gen: dict
    engine_kwargs: dict
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    gold_hint: bool = False  # rationalise: tell the teacher each pair's gold label (distillation targets only)


PAIR_COLUMNS = ("pair_id", "query_id", "query", "title", "attributes", "label")  # what a task needs of its pair

TASK_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("task_index", pa.int64()),  # the task's position in generation order: batch k is tasks [k*B, (k+1)*B)
        ("pair_id", pa.string()),
        ("query_id", pa.string()),
        ("split", pa.string()),
        ("perspective", pa.string()),
        ("sample_idx", pa.int32()),
        ("query", pa.string()),
        ("title", pa.string()),
        ("attributes", pa.string()),
        ("gold_label", pa.string()),
    ]
)

# A rationale row is its task (which keeps what rebuilds the prompt: the pair's query, title and attributes; the
# perspective; the config) plus the judgement and the prompt's hash, not the prompt: its messages were 1.4 KB of a
# row's 2 KB.
OUTPUT_SCHEMA = pa.schema(
    [
        *TASK_SCHEMA,
        ("rationale", pa.string()),
        ("predicted_label", pa.string()),
        ("parse_ok", pa.bool_()),
        ("parse_error", pa.string()),
        ("correct", pa.bool_()),
        ("raw_output", pa.string()),
        ("completion", pa.string()),
        ("prompt_hash", pa.string()),
        ("model", pa.string()),
        ("output_mode", pa.string()),
        ("sampling", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)


def task_id(pair_id: str, perspective: str, sample_idx: int) -> str:
    return f"{pair_id}\x1f{perspective}\x1f{sample_idx}"


def expand_tasks(pairs: pa.Table, perspectives: list[Perspective], samples: int, split: str, first_index: int = 0) -> pa.Table:
    """pairs x perspectives x sample indices, in pair order (a pair's tasks are adjacent), as TASK_SCHEMA rows
    numbered from `first_index`; each row carries what its prompt needs."""
    return _expand(pairs, tuple(p.name for p in perspectives), samples, split, first_index)


def _expand(pairs: pa.Table, names: tuple[str, ...], samples: int, split: str, first_index: int) -> pa.Table:
    per_pair = len(names) * samples
    n = pairs.num_rows * per_pair
    picked = pairs.select(list(PAIR_COLUMNS)).take(pa.array(np.repeat(np.arange(pairs.num_rows), per_pair)))
    perspective = pa.array(np.tile(np.repeat(np.array(names, dtype=object), samples), pairs.num_rows), pa.string())
    sample = pa.array(np.tile(np.arange(samples, dtype=np.int32), pairs.num_rows * len(names)), pa.int32())
    cols = {
        "task_id": pc.binary_join_element_wise(picked.column("pair_id"), perspective, pc.cast(sample, pa.string()), "\x1f"),
        "task_index": pa.array(np.arange(first_index, first_index + n, dtype=np.int64)),
        "pair_id": picked.column("pair_id"),
        "query_id": picked.column("query_id"),
        "split": pa.array([split] * n, pa.string()),
        "perspective": perspective,
        "sample_idx": sample,
        "query": picked.column("query"),
        "title": picked.column("title"),
        "attributes": picked.column("attributes"),
        "gold_label": picked.column("label"),
    }
    return pa.Table.from_arrays([cols[f.name] for f in TASK_SCHEMA], schema=TASK_SCHEMA)


@dataclass(frozen=True)
class PairSource:
    """Pairs to judge: a Parquet file with PAIR_COLUMNS (a split of `prepare`), its first `max_pairs` rows."""

    split: str
    path: str
    max_pairs: int | None = None


@dataclass(frozen=True)
class TaskPlan:
    """The tasks of a generation run without holding them: each source's pairs x perspectives x samples, in order,
    expanded from the Parquet files in Arrow batches. Plain data, so it pickles to any node."""

    sources: tuple[PairSource, ...]
    perspectives: tuple[str, ...]
    samples: int = 1

    def pair_counts(self) -> list[int]:
        counts = []
        for src in self.sources:
            n = pq.read_metadata(src.path).num_rows
            counts.append(n if src.max_pairs is None else min(n, src.max_pairs))
        return counts

    def num_tasks(self) -> int:
        return sum(self.pair_counts()) * len(self.perspectives) * self.samples

    def expanded(self) -> Iterator[pa.Table]:
        """Task tables in order (of any size), numbered from 0."""
        first = 0
        pairs_per_read = max(1, READ_ROWS // (len(self.perspectives) * self.samples))
        for src, n in zip(self.sources, self.pair_counts()):
            if not n:
                continue
            with pq.ParquetFile(src.path) as f:
                for batch in f.iter_batches(batch_size=pairs_per_read, columns=list(PAIR_COLUMNS)):
                    pairs = pa.Table.from_batches([batch]).slice(0, n)
                    n -= pairs.num_rows
                    tasks = _expand(pairs, self.perspectives, self.samples, src.split, first)
                    first += tasks.num_rows
                    yield tasks
                    if n <= 0:
                        break


Tasks = Union[pa.Table, TaskPlan]  # an expanded task table (small runs) or a plan streamed from Parquet


def num_tasks(tasks: Tasks) -> int:
    return tasks.num_rows if isinstance(tasks, pa.Table) else tasks.num_tasks()


def task_batches(tasks: Tasks, size: int) -> Iterator[pa.Table]:
    """The tasks in order, `size` rows at a time (the last batch may be shorter), task_index numbering them from 0."""
    if isinstance(tasks, pa.Table):
        # a table's own numbering is ignored: a concatenation of expand_tasks results restarts it per part
        table = tasks.select([f.name for f in TASK_SCHEMA if f.name != "task_index"])
        table = table.add_column(1, "task_index", pa.array(np.arange(table.num_rows, dtype=np.int64))).cast(TASK_SCHEMA)
        yield from (table.slice(i, size) for i in range(0, table.num_rows, size))
        return
    yield from _rebatch(tasks.expanded(), size)


def _rebatch(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    held: list[pa.Table] = []
    rows = 0
    for t in tables:
        held.append(t)
        rows += t.num_rows
        while rows >= size:
            table = pa.concat_tables(held)
            yield table.slice(0, size).combine_chunks()
            rest = table.slice(size)
            held, rows = [rest], rest.num_rows
    if rows:
        yield pa.concat_tables(held).combine_chunks()


def task_messages(row: dict, perspective: Perspective, labels: list[Label], gen: GenerationConfig,
                  gold: Label | None = None) -> list[dict[str, str]]:
    """The chat messages of a task, or of a rationale row (which keeps its pair's query, title and attributes):
    the same call at generation time and when SFT/DPO rebuild the prompt."""
    pair = {"query": row["query"], "title": row["title"], "attributes": json.loads(row["attributes"] or "{}")}
    return build_messages(pair, perspective, labels, gen.output_mode, gen.rationale_max_chars, gen.max_attribute_chars, gold)


class VLLMJudge:
    """A Ray Data actor: holds one vLLM engine, reads pending tasks from the chunk files it is given and turns each
    batch into judged rows."""

    def __init__(self, spec: JudgeSpec):
        from vllm import LLM

        self.spec = spec
        self.labels = [Label(**lab) for lab in spec.labels]
        self.perspectives = [Perspective(**p) for p in spec.perspectives]
        self.gen = GenerationConfig(**spec.gen)
        self.llm = LLM(model=spec.model_path, seed=self.gen.seed, **spec.engine_kwargs)
        if spec.chat_template:
            self.llm.get_tokenizer().chat_template = spec.chat_template

    def __del__(self):
        """Ray Data deletes its UDF when it retires the actor gracefully: the engine (and its engine process, where
        it has one) stops here, while the actor still lives, not when Ray reaps the actor's children (an engine
        process that outlived its resource tracker printed KeyError tracebacks)."""
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            with suppress(Exception):  # a dead engine has nothing left to stop
                core.shutdown()

    def __call__(self, chunks: pa.Table) -> Iterator[pa.Table]:
        """`chunks`: paths of pending-task files (whole batches, in order); one vLLM call and one output per batch."""
        for path in chunks.column("path").to_pylist():
            tasks = pq.read_table(path)
            for i in range(0, tasks.num_rows, self.gen.batch_size):
                yield judge(self.llm, tasks.slice(i, self.gen.batch_size), self.gen, self.labels, self.perspectives,
                            self.spec.model_name, self.spec.chat_template_kwargs or {}, self.spec.gold_hint)


def judge(llm, tasks: pa.Table, gen: GenerationConfig, labels: list[Label], perspectives: list[Perspective],
          model_name: str, template_kwargs: dict | None = None, gold_hint: bool = False) -> pa.Table:
    """One vLLM pass (two in choice mode) over a batch of tasks -> rows of OUTPUT_SCHEMA. Never raises on bad output.

    gold_hint: each prompt states the task's gold label, and the constrained answer may only name that label."""
    tokenizer = llm.get_tokenizer()
    by_code = {lab.name: lab for lab in labels}
    by_name = {p.name: p for p in perspectives}
    rows_in = tasks.to_pylist()
    golds = [by_code[t["gold_label"]] if gold_hint else None for t in rows_in]
    # sampled answers: one seed per task (greedy needs none)
    seeds = [task_seed(gen.seed, t) for t in rows_in] if gen.temperature > 0 else [None] * len(rows_in)
    sampling = [_sampling_params(gen, [g] if g else labels, s) for g, s in zip(golds, seeds)]
    messages = [task_messages(t, by_name[t["perspective"]], labels, gen, g) for t, g in zip(rows_in, golds)]
    prompts = [render_prompt(tokenizer, m, **(template_kwargs or {})) for m in messages]
    outs = llm.generate(prompts, [s["main"] for s in sampling], use_tqdm=False)
    raw = [o.outputs[0].text for o in outs]
    completion_tokens = [len(o.outputs[0].token_ids) for o in outs]
    if gen.output_mode == "choice":
        # second step: the label is a guided choice among label titles after the free rationale
        follow = [p + r.rstrip() + "\nLabel: " for p, r in zip(prompts, raw)]
        chosen = llm.generate(follow, [s["label"] for s in sampling], use_tqdm=False)
        parsed_all = [_parse_choice(r, c.outputs[0].text, labels) for r, c in zip(raw, chosen)]
        raw = [r.rstrip() + "\nLabel: " + c.outputs[0].text for r, c in zip(raw, chosen)]
        completion_tokens = [n + len(c.outputs[0].token_ids) for n, c in zip(completion_tokens, chosen)]
    else:
        parsed_all = [parse_output(text, labels, gen.output_mode) for text in raw]
    params = json.dumps({"temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": gen.max_tokens,
                         "repetition_penalty": gen.repetition_penalty, "seed": gen.seed})
    rows = []
    for t, m, o, text, ct, parsed in zip(rows_in, messages, outs, raw, completion_tokens, parsed_all):
        rows.append(
            {
                **{k: t[k] for k in TASK_SCHEMA.names},
                "rationale": parsed.rationale,
                "predicted_label": parsed.label,
                "parse_ok": parsed.ok,
                "parse_error": parsed.error,
                "correct": parsed.ok and parsed.label == t["gold_label"],
                "raw_output": text,
                "completion": format_completion(parsed.rationale, by_code[parsed.label].title, gen.output_mode)
                if parsed.ok
                else None,
                "prompt_hash": prompt_hash(m),
                "model": model_name,
                "output_mode": gen.output_mode,
                "sampling": params,
                "prompt_tokens": len(o.prompt_token_ids),
                "completion_tokens": ct,
                "finish_reason": str(o.outputs[0].finish_reason),
            }
        )
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _parse_choice(rationale: str, choice: str, labels: list[Label]) -> ParsedJudgement:
    code = normalise_label(choice, labels)
    return ParsedJudgement(rationale.strip(), code, "" if code else f"label step returned {choice!r}")


def task_seed(seed: int, task: dict) -> int:
    """The sampling seed of one task: a pure function of (seed, pair, perspective, sample), so a sampled answer does
    not depend on which tasks shared its batch, the slot the engine gave it, or a resume. With the engine's seed alone
    every request drew from one shared stream by batch slot: two smoke runs resampled the same 8 answers for DPO, each
    given to the next task over (measured; bench/determinism.py)."""
    key = f"{seed}|{task['pair_id']}|{task['perspective']}|{task['sample_idx']}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def _sampling_params(gen: GenerationConfig, labels: list[Label], seed: int | None = None) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    base = {"temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": gen.max_tokens,
            "repetition_penalty": gen.repetition_penalty, "seed": seed}
    out = {}
    if gen.output_mode == "json":
        out["main"] = SamplingParams(**base, structured_outputs=StructuredOutputsParams(regex=json_regex(labels, gen.rationale_max_chars)))
    else:
        out["main"] = SamplingParams(**base)
    if gen.output_mode == "choice":
        titles = [lab.title for lab in labels]
        # a guided choice may spell the title in any tokenization, down to one byte per token
        longest = max(len(t.encode()) for t in titles)
        out["label"] = SamplingParams(
            temperature=0.0, max_tokens=longest + 1, structured_outputs=StructuredOutputsParams(choice=titles)
        )
    return out


READ_ROWS = 8192  # rows per Arrow batch when expanding tasks or reading rationales
MAX_CHUNKS = 1000  # pending-task files per attempt: bounds the blocks Ray Data tracks in the driver
FILE_ROWS = 65536  # rows per file of a consolidated rationales dataset
GROUP_ROWS = 8192  # rows per Parquet row group in it
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


def run_generation(
    tasks: Tasks,
    out_dir: str | Path,
    spec: JudgeSpec,
    gen: GenerationConfig,
    progress: bool = True,
) -> GenerationResult:
    """Judge every task without a finished part in `out_dir/parts/`, then consolidate the parts, in task order, into
    the Parquet dataset `out_dir/rationales.parquet/`.

    `tasks`: a TaskPlan (pairs streamed from Parquet files; the driver never holds them all) or a table from
    `expand_tasks`. Ray must already be initialised (local or a cluster); on a multi-node cluster `out_dir` must be on
    storage every node mounts (the engine actors read the pending tasks from it).
    """
    import ray

    out_dir = Path(out_dir)
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pending = scan_parts(tasks, parts_dir, gen.batch_size)
    generated, new_tokens = 0, 0
    if pending.tasks:
        resources = ray.cluster_resources()
        place = engine_placement(
            gen.accelerator, resources.get("CPU", 1), resources.get("GPU", 0), gen.concurrency,
            gen.cpus_per_engine, gen.gpus_per_engine, largest_node_cpus(),
        )
        spec = JudgeSpec(**{**asdict(spec), "engine_kwargs": engine_kwargs(place, spec.engine_kwargs)})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, ours, counting judged rows
        # the inputs are file names, not tasks: no Ray task needs a CPU before the engines (which take them all)
        ds = ray.data.from_items(
            [{"path": str(c)} for c in pending.chunks], override_num_blocks=len(pending.chunks)
        ).map_batches(
            VLLMJudge,
            fn_constructor_kwargs={"spec": spec},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=gen.concurrency),
            runtime_env={"env_vars": place.env} if place.env else None,
            **place.remote_args,
        )
        writer = _PartWriter(parts_dir, gen.batch_size, pending.total)
        bar = _progress(pending.tasks, pending.reused, progress)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(block)
            generated += block.num_rows
            new_tokens += pc.sum(block.column("completion_tokens")).as_py() or 0
            if bar:
                bar.update(block.num_rows)
                bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - t0, 1e-9):.0f}")
        if bar:
            bar.close()
    shutil.rmtree(pending.chunk_dir, ignore_errors=True)
    path = out_dir / "rationales.parquet"
    consolidate(parts_dir, pending.total, gen.batch_size, path)
    return GenerationResult(str(path), pending.total, generated, pending.reused, time.time() - t0, new_tokens)


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


class ParquetDatasetWriter:
    """Appends tables to a folder of part-NNNNN.parquet files of at most `file_rows` rows, in row groups of
    `group_rows`; it holds one row group at a time. A folder it closes without rows gets one empty file (the schema)."""

    def __init__(self, folder: Path, schema: pa.Schema, file_rows: int = FILE_ROWS, group_rows: int = GROUP_ROWS):
        self.folder, self.schema, self.file_rows, self.group_rows = Path(folder), schema, file_rows, group_rows
        self.folder.mkdir(parents=True, exist_ok=True)
        self.held: list[pa.Table] = []
        self.held_rows = 0
        self.files = 0
        self.writer: pq.ParquetWriter | None = None
        self.file_rows_written = 0

    def __enter__(self) -> ParquetDatasetWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self.writer:
            self.writer.close()

    def write(self, table: pa.Table) -> None:
        self.held.append(table)
        self.held_rows += table.num_rows
        while self.held_rows >= self.group_rows:
            self._flush(self.group_rows)

    def close(self) -> None:
        while self.held_rows or not self.files:
            self._flush(self.held_rows)
        if self.writer:
            self.writer.close()
            self.writer = None

    def _flush(self, rows: int) -> None:
        """Writes up to `rows` held rows as one row group, no further than the end of the current file."""
        table = pa.concat_tables(self.held) if self.held else self.schema.empty_table()
        if self.writer is None or self.file_rows_written >= self.file_rows:
            if self.writer:
                self.writer.close()
            self.writer = pq.ParquetWriter(self.folder / f"part-{self.files:05d}.parquet", self.schema)
            self.files += 1
            self.file_rows_written = 0
        rows = min(rows, self.file_rows - self.file_rows_written)
        self.writer.write_table(table.slice(0, rows), row_group_size=max(rows, 1))
        self.file_rows_written += rows
        rest = table.slice(rows)
        self.held, self.held_rows = [rest], rest.num_rows


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@contextmanager
def atomic_parquet_writer(path: str | Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter on a temp file beside `path`, renamed to `path` when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = pq.ParquetWriter(tmp, schema)
    try:
        yield writer
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)


class RowBuffer:
    """Rows (dicts) into a ParquetWriter, `size` at a time (a row group each)."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema, size: int = GROUP_ROWS):
        self.writer, self.schema, self.size = writer, schema, size
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []


def dataset_files(path: str | Path) -> list[Path]:
    """The files of a Parquet dataset in order: a folder's *.parquet files by name, or the one file."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    return [path]


def read_batches(path: str | Path, columns: list[str], keep: pc.Expression | None = None,
                 batch_size: int = READ_ROWS) -> Iterator[pa.Table]:
    """A Parquet dataset (or file) in row order, `batch_size` rows and `columns` at a time, filtered by `keep`."""
    for f in dataset_files(path):
        with pq.ParquetFile(f) as pf:
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                table = pa.Table.from_batches([batch])
                yield table.filter(keep) if keep is not None else table


def pair_groups(path: str | Path, columns: list[str], keep: pc.Expression | None = None,
                batch_size: int = READ_ROWS) -> Iterator[list[dict]]:
    """Each pair's rows (dicts of `columns`, which include pair_id), relying on task order: a pair's rows are
    adjacent in a rationales dataset. Holds one batch and one pair."""
    group: list[dict] = []
    for batch in read_batches(path, columns, keep, batch_size):
        for row in batch.to_pylist():
            if group and row["pair_id"] != group[0]["pair_id"]:
                yield group
                group = []
            group.append(row)
    if group:
        yield group


class PromptMismatch(RuntimeError):
    """A prompt rebuilt from a rationale row is not the one the teacher was given."""


def rebuilt_messages(row: dict, perspectives: dict[str, Perspective], labels: list[Label], gen: GenerationConfig,
                     where: str) -> list[dict[str, str]]:
    """The messages a rationale row was generated from, rebuilt from its pair's fields and the config, and checked
    against the row's prompt_hash."""
    perspective = perspectives.get(row["perspective"])
    if perspective is None:
        raise PromptMismatch(f"{where}: pair {row['pair_id']!r} was judged from perspective {row['perspective']!r}, "
                             "which the config no longer has; generate again")
    messages = task_messages(row, perspective, labels, gen)
    if prompt_hash(messages) != row["prompt_hash"]:
        raise PromptMismatch(
            f"{where}: the prompt rebuilt for pair {row['pair_id']!r} ({row['perspective']}) is not the one the teacher "
            f"was given (prompt hash {row['prompt_hash']}, rebuilt {prompt_hash(messages)}): the prompt code, labels or "
            "generation settings changed since; generate again"
        )
    return messages


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))  # TRL's conversational format
SFT_SCHEMA = pa.schema([("pair_id", pa.string()), ("perspective", pa.string()), ("sample_idx", pa.int32()),
                        ("label", pa.string()), ("prompt", MESSAGES), ("completion", MESSAGES)])
_SFT_SOURCE = ["pair_id", "perspective", "sample_idx", "gold_label", "completion", "correct", "query", "title",
               "attributes", "prompt_hash"]


def consistency_filter(rationales_path: str | Path, out_path: str | Path, perspectives: list[Perspective],
                       labels: list[Label], gen: GenerationConfig) -> int:
    """SFT rows (conversational prompt/completion) from the rationales whose label equals the gold label, streamed
    from the rationales dataset into `out_path`; each prompt rebuilt and checked (`rebuilt_messages`). Returns the
    number of rows."""
    by_name = {p.name: p for p in perspectives}
    rows_out = 0
    with atomic_parquet_writer(out_path, SFT_SCHEMA) as writer:
        for batch in read_batches(rationales_path, _SFT_SOURCE, keep=pc.field("correct")):
            rows = [
                {
                    "pair_id": r["pair_id"],
                    "perspective": r["perspective"],
                    "sample_idx": r["sample_idx"],
                    "label": r["gold_label"],
                    "prompt": rebuilt_messages(r, by_name, labels, gen, str(rationales_path)),
                    "completion": [{"role": "assistant", "content": r["completion"]}],
                }
                for r in batch.to_pylist()
            ]
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA))
                rows_out += len(rows)
    return rows_out


def generation_stats(rationales_path: str | Path, perspectives: list[str], labels: list[str]) -> dict:
    """Per-perspective parse rate and accuracy, prediction counts, and agreement between perspectives, counted over
    the rationales dataset in batches (and pair by pair, for agreement)."""
    counts = {name: {"rows": 0, "parsed": 0, "correct": 0, "tokens": 0, "predicted": dict.fromkeys(labels, 0)}
              for name in perspectives}
    total = parsed = correct = 0
    for batch in read_batches(rationales_path, ["perspective", "parse_ok", "correct", "predicted_label", "completion_tokens"]):
        total += batch.num_rows
        parsed += pc.sum(batch.column("parse_ok")).as_py() or 0
        correct += pc.sum(batch.column("correct")).as_py() or 0
        sums = batch.group_by("perspective").aggregate(
            [([], "count_all"), ("parse_ok", "sum"), ("correct", "sum"), ("completion_tokens", "sum")])
        for g in sums.to_pylist():
            if g["perspective"] in counts:
                c = counts[g["perspective"]]
                c["rows"] += g["count_all"]
                c["parsed"] += g["parse_ok_sum"] or 0
                c["correct"] += g["correct_sum"] or 0
                c["tokens"] += g["completion_tokens_sum"] or 0
        by_label = batch.filter(pc.field("parse_ok")).group_by(["perspective", "predicted_label"]).aggregate([([], "count_all")])
        for g in by_label.to_pylist():
            if g["perspective"] in counts and g["predicted_label"] in counts[g["perspective"]]["predicted"]:
                counts[g["perspective"]]["predicted"][g["predicted_label"]] += g["count_all"]
    stats: dict[str, Any] = {"rows": total, "per_perspective": {}, "gold_label_counts": {}}
    for name, c in counts.items():
        n = max(c["rows"], 1)
        stats["per_perspective"][name] = {
            "rows": c["rows"],
            "parse_rate": c["parsed"] / n,
            "accuracy": c["correct"] / n,
            "accuracy_of_parsed": c["correct"] / max(c["parsed"], 1),  # a correct answer is a parsed one
            "predicted_label_counts": c["predicted"],
            "mean_completion_tokens": c["tokens"] / n,
        }
    stats["overall"] = {"parse_rate": parsed / max(total, 1), "accuracy": correct / max(total, 1), "sft_rows": correct}
    stats.update(_agreement(rationales_path, perspectives, labels))
    return stats


def _agreement(rationales_path: str | Path, perspectives: list[str], labels: list[str]) -> dict:
    """Over each pair's first samples: its gold label, pairwise and all-perspective agreement, any/conflicting
    correctness."""
    pairs_of = [(a, b) for i, a in enumerate(perspectives) for b in perspectives[i + 1:]]
    both = dict.fromkeys(pairs_of, 0)
    agree = dict.fromkeys(pairs_of, 0)
    gold = dict.fromkeys(labels, 0)
    n_pairs = full = all_agree = any_correct = conflict = 0
    columns = ["pair_id", "perspective", "sample_idx", "gold_label", "parse_ok", "correct", "predicted_label"]
    for group in pair_groups(rationales_path, columns, keep=pc.field("sample_idx") == 0):
        v = {r["perspective"]: r for r in group}
        n_pairs += 1
        g = next(iter(v.values()))["gold_label"]
        if g in gold:
            gold[g] += 1
        for a, b in pairs_of:
            if a in v and b in v and v[a]["parse_ok"] and v[b]["parse_ok"]:
                both[(a, b)] += 1
                agree[(a, b)] += v[a]["predicted_label"] == v[b]["predicted_label"]
        if len(v) == len(perspectives) and all(r["parse_ok"] for r in v.values()):
            full += 1
            all_agree += len({r["predicted_label"] for r in v.values()}) == 1
        hits = [r["correct"] for r in v.values()]
        any_correct += any(hits)
        conflict += any(hits) and not all(hits)
    return {
        "gold_label_counts": gold,
        "agreement": {
            "pairwise": {f"{a}~{b}": agree[(a, b)] / max(both[(a, b)], 1) for a, b in pairs_of},
            "all_perspectives_agree": all_agree / max(full, 1),
            "pairs_with_any_correct": any_correct / max(n_pairs, 1),
            "pairs_with_conflict": conflict / max(n_pairs, 1),
        },
    }
