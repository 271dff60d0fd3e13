"""JSONL and CSV/TSV files as records: (line an editor shows the record starting on, column -> value), malformed
records collected in `parse_errors`, bytes that are not UTF-8 named by their line."""
from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator

from pairs.errors import DataError

SAMPLED_RECORDS = 1000  # a JSONL file's columns are the keys of its first records
csv.field_size_limit(max(csv.field_size_limit(), 16 << 20))  # long descriptions; memory is bounded by the batch anyway


class TextRecords:
    """The text-file half of `pairs.source.Source` (which sets `path`, `fmt`, `delimiter` and `parse_errors`)."""

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
