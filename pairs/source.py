"""Streaming readers: a JSONL, CSV/TSV or Parquet file as Arrow batches of text columns (`pairs.text.text_of`).

Memory is bounded by the batch: text files are read line by line, Parquet by record batches, and only the
requested columns are kept. Each batch carries `__line__` (the line an editor shows a text record starting on, or
the Parquet row) and `__rec__` (the record's 0-based position in the file).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pairs.errors import DataError
from pairs.text import TEXT_FIELDS, arrow_text, json_reads_as_text, text_of
from pairs.textfiles import TextRecords

BATCH_ROWS = 8192  # ~12 MB of product text at ESCI's lengths; the checks' temporaries are a few times that


def detect_format(path: Path, fmt: str, key: str = "data.format") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the extension {suffix!r}; set {key} to jsonl, csv or parquet")



class Source(TextRecords):
    """One input file. `columns`: the columns it has (a JSONL file: the keys of its first records); `unit`: 'line' or
    'row'; `parse_errors`: malformed records met so far (invalid JSON, CSV records with extra fields)."""

    def __init__(self, path: str | Path, fmt: str, config_key: str, what: str):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: file not found; set {config_key} in the config to {what}")
        self.fmt = detect_format(self.path, fmt, config_key.rsplit(".", 1)[0] + ".format")
        self.unit = "row" if self.fmt == "parquet" else "line"
        self.parse_errors: list[str] = []
        self.schema: pa.Schema | None = None
        self.records = 0
        if self.fmt == "parquet":
            try:
                # buffered column reads: a row group (a pandas-written file has one of up to 1M rows) is decoded
                # batch by batch instead of whole
                self._parquet = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"{self.path}: cannot read as {self.fmt}: {exc}") from None
            self.schema = self._parquet.schema_arrow
            self.columns = list(self.schema.names)
        elif self.fmt == "jsonl":
            self.columns = self._jsonl_keys()
        else:
            self.delimiter = "\t" if self.fmt == "tsv" or self.path.suffix.lower() == ".tsv" else ","
            self.columns = self._csv_header()

    # ---- whole-file scans ------------------------------------------------------------------------------------
    def batches(self, wanted: list[str], json_fields: dict[str, str] | None = None,
                batch_rows: int | None = None) -> Iterator[tuple[pa.Table, list[tuple[int, int, str]]]]:
        """(batch, type problems) pairs: `wanted` columns as text (those the file lacks: all ""), `__line__`,
        `__rec__`. Type problems (JSONL only; Parquet types are checked from the schema): (rec, order, message) for
        a JSON object or array where `json_fields` (field -> column) wants text."""
        self.records = 0
        batch_rows = batch_rows or BATCH_ROWS
        if self.fmt == "parquet":
            yield from ((b, []) for b in self._parquet_batches(wanted, batch_rows))
            return
        records = self._jsonl_records() if self.fmt == "jsonl" else self._csv_records()
        fields = list((json_fields or {}).items()) if self.fmt == "jsonl" else []
        cols: dict[str, list[str]] = {c: [] for c in wanted}
        lines: list[int] = []
        recs: list[int] = []
        problems: list[tuple[int, int, str]] = []
        for line, values in records:
            rec = self.records
            self.records += 1
            for order, (fname, col) in enumerate(fields):
                value = values.get(col)
                if col in values and not json_reads_as_text(fname, value):
                    problems.append((rec, order, f"{self.path} line {line}: {fname} (column {col!r}) is a JSON "
                                     f"{'object' if isinstance(value, dict) else 'array'}; {fname} must be "
                                     f"{'text' if fname in TEXT_FIELDS else 'text, a number or a list of them'}"))
            for c in wanted:
                cols[c].append(text_of(values.get(c)))
            lines.append(line)
            recs.append(rec)
            if len(lines) >= batch_rows:
                yield self._table(cols, lines, recs), problems
                cols, lines, recs, problems = {c: [] for c in wanted}, [], [], []
        if lines or not self.records:
            yield self._table(cols, lines, recs), problems

    def drain(self) -> None:
        """Read to the end only to find the malformed records (and count the records)."""
        self.records = 0
        if self.fmt != "parquet":
            for _ in self._jsonl_records() if self.fmt == "jsonl" else self._csv_records():
                self.records += 1
        else:
            self.records = self._parquet.metadata.num_rows

    @staticmethod
    def _table(cols: dict[str, list[str]], lines: list[int], recs: list[int]) -> pa.Table:
        arrays = {c: pa.array(v, pa.string()) for c, v in cols.items()}
        return pa.table({**arrays, "__line__": pa.array(lines, pa.int64()), "__rec__": pa.array(recs, pa.int64())})

    def _parquet_batches(self, wanted: list[str], batch_rows: int) -> Iterator[pa.Table]:
        present = [c for c in dict.fromkeys(wanted) if c in self.columns]
        try:
            # use_threads=False: with threads every column chunk of the row group is read at once (measured: 613 MB
            # of Arrow memory for a 300k-row row group, 46 MB without)
            it = self._parquet.iter_batches(batch_size=batch_rows, columns=present, use_threads=False)
            for batch in it:
                n, start = batch.num_rows, self.records
                self.records += n
                arrays = {c: arrow_text(batch.column(c)) if c in present else pa.array([""] * n, pa.string())
                          for c in wanted}
                rec = pa.array(range(start, start + n), pa.int64())
                yield pa.table({**arrays, "__line__": pc.add(rec, 1), "__rec__": rec})
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{self.path}: cannot read as {self.fmt}: {exc}") from None
        if not self.records:
            yield pa.table({**{c: pa.array([], pa.string()) for c in wanted}, "__line__": pa.array([], pa.int64()),
                            "__rec__": pa.array([], pa.int64())})
