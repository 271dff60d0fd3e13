"""Streaming readers: a JSONL, CSV/TSV or Parquet file as Arrow batches of text columns.

Every value becomes its text the one way the data layer reads it (`text_of`): strings stripped of leading and
trailing whitespace, numbers as written (label `2` -> "2"), lists joined with spaces, null/NaN/missing -> "".
Memory is bounded by the batch: text files are read line by line, Parquet by record batches, and only the
requested columns are kept. Each batch carries `__line__` (the line an editor shows a text record starting on, or
the Parquet row) and `__rec__` (the record's 0-based position in the file).
"""
from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BATCH_ROWS = 8192  # ~12 MB of product text at ESCI's lengths; the checks' temporaries are a few times that
MAX_REPORTED = 20
TEXT_FIELDS = ("query", "title")  # the text every model reads: strings only, never a repr of bytes or objects
SAMPLED_RECORDS = 1000  # a JSONL file's columns are the keys of its first records
csv.field_size_limit(max(csv.field_size_limit(), 16 << 20))  # long descriptions; memory is bounded by the batch anyway
# what str.strip() strips, so that Arrow trims strings exactly as Python does
PY_WHITESPACE = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


class DataError(ValueError):
    """Input data that cannot be used. The message lists each bad row with its file, row and fix."""


def raise_problems(errors: list[str], count: int | None = None) -> None:
    """`N problem(s) in the input data:` and the first MAX_REPORTED of them (`count`: the total, if more were found
    than listed)."""
    count = len(errors) if count is None else count
    if count:
        more = f"\n... and {count - MAX_REPORTED} more" if count > MAX_REPORTED else ""
        raise DataError(f"{count} problem(s) in the input data:\n" + "\n".join(errors[:MAX_REPORTED]) + more)


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


def text_of(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from CSV/pandas-written Parquet
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(text_of(v) for v in value)
    return str(value).strip()


def arrow_text(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`text_of` of every value, vectorised where Arrow formats values as Python does (strings, integers, lists of
    those); other types (floats, booleans, decimals) go through Python."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pc.utf8_trim(arr.cast(pa.string()), characters=PY_WHITESPACE).fill_null("")
    if pa.types.is_null(t):
        return pa.array([""] * len(arr), pa.string())
    if pa.types.is_integer(t):
        return arr.cast(pa.string()).fill_null("")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values = arrow_text(arr.values)  # the whole child array: the offsets index into it
        joined = pc.binary_join(type(arr).from_arrays(arr.offsets, values), " ")
        return joined.cast(pa.string()).fill_null("")
    return pa.array([text_of(v) for v in arr.to_pylist()], pa.string())


def json_reads_as_text(field: str, value) -> bool:
    """A JSONL value fit for `field`: no objects anywhere, arrays only outside query and title."""
    if isinstance(value, list):
        return field not in TEXT_FIELDS and all(json_reads_as_text(field, v) for v in value)
    return not isinstance(value, dict)


def arrow_reads_as_text(field: str, t: pa.DataType) -> bool:
    """Query and title must be string columns; labels, ids and attributes may also be numbers or lists (of strings
    or numbers). Anything else (bytes, structs, maps) would reach prompts as a Python repr."""
    if pa.types.is_dictionary(t):  # pandas categoricals
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t):
        return True
    if field in TEXT_FIELDS:
        return False
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return arrow_reads_as_text(field, t.value_type)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)


@dataclass
class Problems:
    """Counts every problem of the rows and keeps the first MAX_REPORTED by position: key (file, record, order
    within the row), so the listing reads like the file whatever order the rows were checked in."""

    count: int = 0
    kept: list[tuple[tuple, str]] = field(default_factory=list)

    def wants(self, key: tuple) -> bool:
        """Whether a problem at `key` would be listed (else counting it is enough: no message to format)."""
        return len(self.kept) < MAX_REPORTED or key < self.kept[-1][0]

    def add(self, key: tuple, message: str) -> None:
        self.count += 1
        if self.wants(key):
            bisect.insort(self.kept, (key, message))
            del self.kept[MAX_REPORTED:]

    def raise_if_any(self) -> None:
        raise_problems([message for _, message in self.kept], self.count)


class Source:
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

    # ---- text files --------------------------------------------------------------------------------------------
    def _raw_lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text) split on "\\n" only (str.splitlines would also break at U+2028, which JSON strings
        may hold); the first line loses a UTF-8 byte-order mark."""
        try:
            fh = open(self.path, "rb")
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read as {self.fmt}: {exc}") from None
        with fh:
            for i, raw in enumerate(fh, start=1):
                try:
                    yield i, raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError:
                    self._raise_not_utf8()

    def _jsonl_keys(self) -> list[str]:
        keys: dict[str, None] = {}
        seen = 0
        for _, obj in self._jsonl_objects(report=False):
            keys.update(dict.fromkeys(obj))
            seen += 1
            if seen >= SAMPLED_RECORDS:
                break
        return list(keys)

    def _jsonl_objects(self, report: bool = True) -> Iterator[tuple[int, dict]]:
        for i, line in self._raw_lines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if report:
                    self.parse_errors.append(f"{self.path} line {i}: invalid JSON ({exc.msg} at column {exc.colno}); "
                                             "fix or remove the line")
                continue
            if not isinstance(obj, dict):
                if report:
                    self.parse_errors.append(f"{self.path} line {i}: expected a JSON object per line, got {type(obj).__name__}")
                continue
            yield i, obj

    def _jsonl_records(self) -> Iterator[tuple[int, dict]]:
        self.parse_errors = []
        return self._jsonl_objects()

    def _text_stream(self) -> io.TextIOWrapper:
        # newline="": quoted line breaks stay in their field and every line end counts as a line, as an editor shows
        return io.TextIOWrapper(open(self.path, "rb"), encoding="utf-8-sig", newline="")

    def _csv_header(self) -> list[str]:
        try:
            with self._text_stream() as fh:
                return next(csv.reader(fh, delimiter=self.delimiter, dialect=csv.excel), [])
        except UnicodeDecodeError:
            self._raise_not_utf8()
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read as {self.fmt}: {exc}") from None

    def _csv_records(self) -> Iterator[tuple[int, dict]]:
        """CSV/TSV as spreadsheets write it: quoted fields may hold the delimiter, quotes and line breaks. A record
        spanning lines is reported at its first line; fewer fields than the header leave the rest missing."""
        self.parse_errors = []
        end = 0
        try:
            with self._text_stream() as fh:
                reader = csv.reader(fh, delimiter=self.delimiter, dialect=csv.excel)
                header = next(reader, [])
                index = {name: i for i, name in enumerate(header)}  # a repeated name: its last column, as dict(zip)
                end = reader.line_num
                for fields in reader:
                    start, end = end + 1, reader.line_num
                    if not fields:
                        continue
                    if len(fields) > len(header):
                        self.parse_errors.append(
                            f"{self.path} line {start}: {len(fields)} fields but the header has {len(header)}; quote "
                            f"fields that contain {self.delimiter!r} or remove the extra ones")
                        continue
                    yield start, _FieldView(index, fields)
        except UnicodeDecodeError:
            self._raise_not_utf8()
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read as {self.fmt}: {exc}") from None
        except csv.Error as exc:  # e.g. a field over the size limit: an unclosed quote swallowing the rest of the file
            raise DataError(f"{self.path} line {end + 1}: {exc} in the record starting here; look for a quote (\") that "
                            "opens a field and is never closed") from None

    def _raise_not_utf8(self):
        """Name the first byte that is not UTF-8 by its line (read again in chunks: the error came mid-stream)."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        newlines = 0
        with open(self.path, "rb") as fh:
            while True:
                chunk = fh.read(1 << 20)
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    # exc.object: the start of a sequence held back from the previous chunk (never a line break), then
                    # this chunk
                    line = newlines + exc.object.count(b"\n", 0, exc.start) + 1
                    raise DataError(
                        f"{self.path} line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}: {exc.reason}); "
                        "re-encode the file as UTF-8 (a spreadsheet's \"CSV UTF-8\" export, or `iconv -f cp1252 -t "
                        "utf-8`)") from None
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
        raise DataError(f"{self.path}: cannot read as {self.fmt}: not UTF-8 text")


class _FieldView:
    """A CSV record as a read-only mapping column -> field, without building a dict per record."""

    __slots__ = ("_index", "_fields")

    def __init__(self, index: dict[str, int], fields: list[str]):
        self._index, self._fields = index, fields

    def get(self, key, default=None):
        i = self._index.get(key)
        return self._fields[i] if i is not None and i < len(self._fields) else default

    def __contains__(self, key) -> bool:
        i = self._index.get(key)
        return i is not None and i < len(self._fields)
