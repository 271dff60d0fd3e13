"""Parquet helpers without domain logic, shared by generation (mpcot), the stages (workflows) and the student:
writing a file or a folder atomically, appending to a dataset folder in bounded row groups, and reading a file or a
folder a bounded number of rows at a time."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

READ_ROWS = 8192  # rows per Arrow batch when reading
FILE_ROWS = 65536  # rows per file of a dataset folder (ParquetDatasetWriter)
GROUP_ROWS = 8192  # rows per Parquet row group in it


# ---- writing -------------------------------------------------------------------------------------------------------
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


# ---- reading -------------------------------------------------------------------------------------------------------
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


def parquet_files(folder: str | Path) -> list[Path]:
    """The Parquet files of an examples folder (or the file itself), sorted by their path under it."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(folder.rglob("*.parquet"), key=lambda p: p.relative_to(folder).as_posix())


def read_rows(files: list[Path], columns: list[str] | None = None, batch_rows: int = READ_ROWS) -> Iterator[pa.Table]:
    """The rows of `files` in the order given, row group after row group, at most `batch_rows` at a time."""
    for f in files:
        pf = pq.ParquetFile(f)
        for b in pf.iter_batches(batch_size=batch_rows, columns=columns):
            if b.num_rows:
                yield pa.Table.from_batches([b])


def batches(path: str | Path, columns: list[str] | None = None, batch_rows: int = 8192):
    """Record batches of a Parquet file or folder, a bounded number of rows at a time."""
    for b in pads.dataset(str(path), format="parquet").to_batches(columns=columns, batch_size=batch_rows):
        yield pa.Table.from_batches([b])


# ---- rewriting -----------------------------------------------------------------------------------------------------
def canonical_parquet(src: str, dst: str, keys: list[str], bucket_bytes: int = 64 << 20) -> int:
    """The rows of the Parquet folder `src` rewritten to `dst` as part-<bucket>.parquet files: a row's bucket is a
    hash of its first key, each bucket sorted by `keys` (unique per row). Two passes, memory bounded by a bucket."""
    import shutil
    import zlib

    files = parquet_files(src)
    buckets = max(1, -(-sum(Path(f).stat().st_size for f in files) // bucket_bytes))
    work, out = Path(dst).with_name(Path(dst).name + ".buckets"), Path(dst)
    for d in (work, out):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    writers: dict[int, pq.ParquetWriter] = {}
    for t in read_rows(files):
        which = np.array([zlib.crc32(str(k).encode()) % buckets for k in t.column(keys[0]).to_pylist()])
        for b in np.unique(which):
            part = t.filter(pa.array(which == b))
            if b not in writers:
                writers[b] = pq.ParquetWriter(work / f"{b:05d}.parquet", part.schema)
            writers[b].write_table(part.cast(writers[b].schema))
    for w in writers.values():
        w.close()
    n = 0
    for b in sorted(writers):
        t = pq.read_table(work / f"{b:05d}.parquet").sort_by([(k, "ascending") for k in keys])
        pq.write_table(t, out / f"part-{b:05d}.parquet")
        n += t.num_rows
    shutil.rmtree(work, ignore_errors=True)
    return n


def canonicalise(folders: list[str], keys: list[str]) -> None:
    """Each Parquet folder rewritten in place as canonical_parquet files (scored parts arrive in the order actors
    finish: the same rows, other files)."""
    import os
    import shutil

    for folder in folders:
        tmp = f"{folder}.canonical"
        canonical_parquet(folder, tmp, keys)
        shutil.rmtree(folder)
        os.replace(tmp, folder)
