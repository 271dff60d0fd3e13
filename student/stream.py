"""A training epoch's batches as a pure function of (examples files, seed, epoch, rank, world size).

Why not Ray Data's streaming split: `DataConfig` hands each block to whichever worker has the fewest rows as blocks
arrive, read tasks finish in any order, and the collate thread pool draws one random generator in thread order;
four retrains of one student with one seed gave four different students. Here every worker reads the examples'
Parquet files itself (streaming, a bounded number of rows at a time; Ray Data still builds the examples and scores
the students), and every random choice comes from a generator seeded by (seed, epoch[, window or chunk]):

1. the files, sorted by name, are read in an order permuted per (seed, epoch);
2. rows pass through shuffle windows of about `shuffle_rows` rows, each permuted by (seed, epoch, window);
3. the row stream is cut into chunks of `batch_size * length_window` rows; inside a chunk the rows are sorted by
   text length (batches of similar length pad less) and cut into batches, whose order is permuted by
   (seed, epoch, chunk);
4. batch g of the epoch goes to rank g % world (the old code's dealing): every rank computes the same stream and
   keeps its own batches, so ranks differ by at most one batch (the lockstep guard drops that one).

The same inputs give every rank the same batches in the same order, run after run and after a resume (a resumed
epoch skips the batches it had finished, without tokenising them). Memory is bounded by the window, not the split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairs.parquet import parquet_files, read_rows


def rng(*parts: int) -> np.random.Generator:
    """The generator of one random stream, named by its integers (seed, epoch, rank, ...): never a shared one."""
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch's rows become batches (see the module docstring)."""

    batch_size: int
    length_window: int = 32
    shuffle_rows: int = 4096

    @property
    def chunk_rows(self) -> int:
        return self.batch_size * self.length_window

    def batches_in(self, rows: int) -> int:
        """Batches of an epoch of `rows` rows (all ranks together): full chunks, then the last partial one."""
        full, rest = divmod(rows, self.chunk_rows)
        return full * self.length_window + -(-rest // self.batch_size)

    def steps(self, rows: int, world: int) -> int:
        """Steps every rank takes in an epoch (the lockstep guard stops when one rank has no batch left)."""
        return max(1, self.batches_in(rows) // world)


def _windows(files: list[Path], seed: int, epoch: int, shuffle_rows: int) -> Iterator[pa.Table]:
    """The rows in shuffle windows: files in a per-(seed, epoch) order, each window's rows permuted."""
    order = rng(seed, epoch).permutation(len(files))
    buf, n, w = [], 0, 0
    for t in read_rows([files[i] for i in order]):
        buf.append(t)
        n += t.num_rows
        if n >= shuffle_rows:
            window = pa.concat_tables(buf)
            yield window.take(pa.array(rng(seed, epoch, 1, w).permutation(window.num_rows)))
            buf, n, w = [], 0, w + 1
    if n:
        window = pa.concat_tables(buf)
        yield window.take(pa.array(rng(seed, epoch, 1, w).permutation(window.num_rows)))


def _chunks(windows: Iterator[pa.Table], chunk_rows: int) -> Iterator[pa.Table]:
    """The row stream cut into chunks of exactly `chunk_rows` rows (the last one shorter)."""
    rest: pa.Table | None = None
    for w in windows:
        t = w if rest is None else pa.concat_tables([rest, w])
        start = 0
        while t.num_rows - start >= chunk_rows:
            yield t.slice(start, chunk_rows)
            start += chunk_rows
        rest = t.slice(start) if start < t.num_rows else None
    if rest is not None and rest.num_rows:
        yield rest


def text_lengths(chunk: pa.Table) -> np.ndarray:
    """Characters of query + product: the sort key for length grouping (no tokenising of batches another rank keeps)."""
    return (pc.utf8_length(chunk.column("query")).to_numpy(zero_copy_only=False).astype(np.int64)
            + pc.utf8_length(chunk.column("product")).to_numpy(zero_copy_only=False).astype(np.int64))


def epoch_batches(files: list[Path], plan: EpochPlan, seed: int, epoch: int, rank: int, world: int,
                  skip: int = 0) -> Iterator[pa.Table]:
    """This rank's batches (example rows) of one epoch, in order, the first `skip` of them left out."""
    g, mine = 0, 0
    for c, chunk in enumerate(_chunks(_windows(files, seed, epoch, plan.shuffle_rows), plan.chunk_rows)):
        if plan.length_window > 1:
            idx = np.argsort(text_lengths(chunk), kind="stable")
        else:
            idx = np.arange(chunk.num_rows)
        cuts = [idx[s : s + plan.batch_size] for s in range(0, len(idx), plan.batch_size)]
        for b in rng(seed, epoch, 2, c).permutation(len(cuts)):
            if g % world == rank:
                if mine >= skip:
                    yield chunk.take(pa.array(cuts[b]))
                mine += 1
            g += 1


def validation_rows(folder: str | Path, batch_rows: int) -> Iterator[pa.Table]:
    """The validation examples in file order (nothing random: every rank reads the same rows)."""
    return read_rows(parquet_files(folder), batch_rows=batch_rows)


