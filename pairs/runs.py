"""Canonical rows on disk: Parquet runs, each sorted by record, and their k-way merge back into record order."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pairs.canonical import LINE, REC, TEST

RUN_ROW_GROUP = 4096  # rows per row group of a run: the merge holds about one of each run at a time
RUN_FORMAT = {"compression": "none", "use_dictionary": False}  # runs are read once, soon: no time spent encoding
RUN_BYTES = 64 << 20  # canonical rows buffered before a sorted run goes to disk (joined layouts)


class RunWriter:
    """Canonical rows -> Parquet runs under `workdir`, each sorted by record. `ordered`: rows arrive in record order
    (one run, written as they come); otherwise they are buffered and sorted into runs of about RUN_BYTES."""

    def __init__(self, workdir: Path, ordered: bool):
        self.workdir, self.ordered = workdir, ordered
        self.runs: list[Path] = []
        self.index: list[pa.Table] = []
        self._buffer: list[pa.Table] = []
        self._bytes = 0
        self._writer: pq.ParquetWriter | None = None

    def add(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        self.index.append(rows.select([c for c in ("pair_id", "query_id", "label", REC, LINE, TEST) if c in rows.column_names]))
        rows = rows.drop_columns([LINE])
        if self.ordered:
            if self._writer is None:
                self.runs.append(self.workdir / "run-0.parquet")
                self._writer = pq.ParquetWriter(self.runs[0], rows.schema, **RUN_FORMAT)
            self._writer.write_table(rows)
            return
        self._buffer.append(rows)
        self._bytes += rows.nbytes
        if self._bytes >= RUN_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            rows = pa.concat_tables(self._buffer)  # no copy: chunks
            self._buffer, self._bytes = [], 0
            path = self.workdir / f"run-{len(self.runs)}.parquet"
            order = pc.sort_indices(rows.column(REC).combine_chunks())
            pq.write_table(rows.take(order), path, row_group_size=RUN_ROW_GROUP, **RUN_FORMAT)
            del rows, order
            self.runs.append(path)

    def close(self) -> pa.Table:
        """The index of every row written, in record order."""
        if self._writer is not None:
            self._writer.close()
        self._flush()
        if not self.index:
            return pa.table({"pair_id": pa.array([], pa.string()), "query_id": pa.array([], pa.string()),
                             "label": pa.array([], pa.string()), REC: pa.array([], pa.int64()),
                             LINE: pa.array([], pa.int64())})
        index = pa.concat_tables(self.index)
        self.index = []
        return index if self.ordered else index.take(pc.sort_indices(index, [(REC, "ascending")]))


def _read_run(path: Path, batch_rows: int):
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(batch_size=batch_rows, use_threads=False)


def merge_runs(runs: list[Path], batch_rows: int = 2048) -> Iterator[pa.Table]:
    """k-way merge of runs sorted by record: the rows of all runs in record order, a few batches in memory at a time."""
    if len(runs) == 1:
        for batch in _read_run(runs[0], 4 * batch_rows):
            yield pa.Table.from_batches([batch])
        return
    iters = [_read_run(p, batch_rows) for p in runs]
    heads = [next(it, None) for it in iters]
    while any(h is not None for h in heads):
        live = [i for i, h in enumerate(heads) if h is not None]
        bound = min(heads[i].column(REC)[-1].as_py() for i in live)
        parts = []
        for i in live:
            cut = int(np.searchsorted(heads[i].column(REC).to_numpy(), bound, side="right"))
            parts.append(heads[i].slice(0, cut))
            rest = heads[i].slice(cut)
            heads[i] = rest if rest.num_rows else next(iters[i], None)
        merged = pa.Table.from_batches(parts)
        yield merged.take(pc.sort_indices(merged, [(REC, "ascending")]))
