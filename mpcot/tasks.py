"""Generation tasks: pairs x perspectives x samples, in a fixed order (batch k is tasks [k*B, (k+1)*B)), expanded from
the split's Parquet in Arrow batches; the task and rationale row schemas."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mpcot.perspectives import Perspective
from pairs.parquet import READ_ROWS


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
