"""The one dataset reader: labelled (query, product) pairs from JSONL, CSV or Parquet, validated, then split
by query.

Canonical pair table (what every stage reads): pair_id, query_id, product_id, query, title,
attributes (JSON object string of the non-empty attributes), label (a label code).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workflows.config import ColumnMap, SplitConfig

PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("query_id", pa.string()),
        ("product_id", pa.string()),
        ("query", pa.string()),
        ("title", pa.string()),
        ("attributes", pa.string()),
        ("label", pa.string()),
    ]
)
MAX_REPORTED = 20
TEXT_FIELDS = ("query", "title")  # the text every model reads: strings only, never a repr of bytes or objects


class DataError(ValueError):
    """Input data that cannot be used. The message lists each bad row with its file, row and fix."""


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the extension {suffix!r}; set data.format to jsonl, csv or parquet")


def read_records(path: Path, fmt: str) -> tuple[list[dict], str]:
    """Raw records, each with `__line__` (the line an editor shows a text record starting on, or the Parquet row),
    plus the word for that position ('line' or 'row')."""
    if not path.exists():
        raise DataError(f"{path}: file not found; set data.path in the config to your labelled pairs")
    fmt = detect_format(path, fmt)
    try:
        if fmt == "parquet":
            return [dict(r, __line__=i) for i, r in enumerate(pq.read_table(path).to_pylist(), start=1)], "row"
        raw = path.read_bytes()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: cannot read as {fmt}: {exc}") from None
    text = _decode(path, raw)
    return (_csv_records(path, text) if fmt == "csv" else _jsonl_records(path, text)), "line"


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text, with or without the byte-order mark Excel's "CSV UTF-8" writes; a bad byte is named by its line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}: {exc.reason}); re-encode the file "
            "as UTF-8 (a spreadsheet's \"CSV UTF-8\" export, or `iconv -f cp1252 -t utf-8`)"
        ) from None


def _csv_records(path: Path, text: str) -> list[dict]:
    """CSV/TSV as spreadsheets write it: quoted fields may hold the delimiter, quotes and line breaks."""
    dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect)
    header = next(reader, [])
    records, errors, end = [], [], reader.line_num
    for fields in reader:
        # a record spanning lines (a quoted line break) is reported at its first line
        start, end = end + 1, reader.line_num
        if not fields:
            continue
        if len(fields) > len(header):
            errors.append(f"{path} line {start}: {len(fields)} fields but the header has {len(header)}; quote fields "
                          f"that contain {dialect.delimiter!r} or remove the extra ones")
            continue
        records.append(dict(zip(header, fields), __line__=start))
    _raise(errors)
    return records


def _jsonl_records(path: Path, text: str) -> list[dict]:
    records, errors = [], []
    # split on "\n" only: str.splitlines would also break at U+2028 and other characters JSON strings may hold
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{path} line {i}: invalid JSON ({exc.msg} at column {exc.colno}); fix or remove the line")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{path} line {i}: expected a JSON object per line, got {type(obj).__name__}")
            continue
        obj["__line__"] = i
        records.append(obj)
    _raise(errors)
    return records


def _raise(errors: list[str]) -> None:
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DataError(f"{len(errors)} problem(s) in the input data:\n" + "\n".join(errors[:MAX_REPORTED]) + more)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from CSV/pandas-written Parquet
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    return str(value).strip()


def _mapped_fields(columns: ColumnMap) -> dict[str, str]:
    """field -> the column the config maps it to (attributes as `attributes.<name>`)."""
    fields = {f: getattr(columns, f) for f in ("query", "title", "label", "pair_id", "query_id", "product_id")}
    fields |= {f"attributes.{name}": col for name, col in columns.attributes.items()}
    return {f: col for f, col in fields.items() if col}


def _arrow_reads_as_text(field: str, t: pa.DataType) -> bool:
    """Query and title must be string columns; labels, ids and attributes may also be numbers or lists (of strings
    or numbers). Anything else (bytes, structs, maps) would reach prompts as a Python repr."""
    if pa.types.is_dictionary(t):  # pandas categoricals
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t):
        return True
    if field in TEXT_FIELDS:
        return False
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _arrow_reads_as_text(field, t.value_type)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)


def _json_reads_as_text(field: str, value) -> bool:
    """The same rule for a JSONL value: no objects anywhere, arrays only outside query and title."""
    if isinstance(value, list):
        return field not in TEXT_FIELDS and all(_json_reads_as_text(field, v) for v in value)
    return not isinstance(value, dict)


def load_pairs(path: str | Path, fmt: str, columns: ColumnMap, label_codes: list[str]) -> pa.Table:
    """Read, map columns and validate every row; raise DataError listing every problem (nothing is written)."""
    path = Path(path)
    records, unit = read_records(path, fmt)
    if not records:
        raise DataError(f"{path}: no rows; the file must hold at least one labelled pair")
    present = set().union(*(r.keys() for r in records[:1000]))
    required = {"query": columns.query, "title": columns.title, "label": columns.label}
    for field in ("pair_id", "query_id"):
        if getattr(columns, field):
            required[field] = getattr(columns, field)
    missing = [f"{field} (column {col!r})" for field, col in required.items() if col not in present]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; the file has {sorted(k for k in present if k != '__line__')}. "
            "Fix the file or map the columns under data.columns in the config"
        )
    fields = _mapped_fields(columns)
    if unit == "row":
        schema = pq.read_schema(path)
        _raise([f"{path}: column {col!r} ({field}) has type {schema.field(col).type}; {field} must be "
                f"{'a string' if field in TEXT_FIELDS else 'a string, number or list (of those)'} column. Write it as "
                f"one (decode bytes as UTF-8, take the text out of a struct) or map another column under data.columns.{field}"
                for field, col in fields.items() if col in schema.names and not _arrow_reads_as_text(field, schema.field(col).type)])
    by_lower = {c.lower(): c for c in label_codes}
    errors, rows, seen = [], [], {}
    for idx, rec in enumerate(records):
        where = f"{path} {unit} {rec['__line__']}"
        errors += [f"{where}: {field} (column {col!r}) is a JSON {'object' if isinstance(rec[col], dict) else 'array'}; "
                   f"{field} must be {'text' if field in TEXT_FIELDS else 'text, a number or a list of them'}"
                   for field, col in fields.items() if col in rec and not _json_reads_as_text(field, rec[col])]
        query, title, label = _text(rec.get(columns.query)), _text(rec.get(columns.title)), _text(rec.get(columns.label))
        if not query:
            errors.append(f"{where}: empty query (column {columns.query!r}); fill it in or remove the row")
        if not title:
            errors.append(f"{where}: empty product title (column {columns.title!r}); fill it in or remove the row")
        code = by_lower.get(label.lower())
        if not label:
            errors.append(f"{where}: no label (column {columns.label!r}); give the pair one of {', '.join(label_codes)} or remove the row")
        elif code is None:
            errors.append(
                f"{where}: label {label!r} is not one of {', '.join(label_codes)}; fix the label or add it to `labels` in the config"
            )
        pair_id = _text(rec.get(columns.pair_id)) if columns.pair_id else f"row-{idx + 1}"
        if not pair_id:
            errors.append(f"{where}: empty pair id (column {columns.pair_id!r}); give every pair a unique id")
        elif pair_id in seen:
            errors.append(f"{where}: duplicate pair id {pair_id!r} (first at {unit} {seen[pair_id]}); pair ids must be unique")
        else:
            seen[pair_id] = rec["__line__"]
        query_id = _text(rec.get(columns.query_id)) if columns.query_id else ""
        query_id = query_id or "q-" + hashlib.sha1(query.lower().encode()).hexdigest()[:12]
        attrs = {name: _text(rec.get(col)) for name, col in columns.attributes.items() if _text(rec.get(col))}
        rows.append(
            {
                "pair_id": pair_id,
                "query_id": query_id,
                "product_id": _text(rec.get(columns.product_id)) if columns.product_id else "",
                "query": query,
                "title": title,
                "attributes": json.dumps(attrs, ensure_ascii=False),
                "label": code,
            }
        )
    _raise(errors)
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def split_by_query(pairs: pa.Table, split: SplitConfig) -> dict[str, pa.Table]:
    """Seeded query-disjoint split, stratified by label: every query's pairs land in one split, and each split's
    label counts follow the configured fractions as closely as whole queries allow.

    Iterative stratification (Sechidis et al., 2011) over query groups: queries holding the rarest labels are
    placed first (then the larger queries), each in the split that still needs the largest share of its labels (ties: the split that needs
    the most pairs, then a seeded coin). A rare class therefore reaches val and test whenever it spans enough
    queries; `label_support` tells whether it did.
    """
    names = pairs.column("query_id").to_pylist()
    labels = pairs.column("label").to_pylist()
    classes = sorted(set(labels))
    cidx = {c: i for i, c in enumerate(classes)}
    counts: dict[str, np.ndarray] = {}
    for q, lab in zip(names, labels):
        counts.setdefault(q, np.zeros(len(classes)))[cidx[lab]] += 1
    qids = sorted(counts)
    rng = random.Random(split.seed)
    rng.shuffle(qids)
    total = np.sum(list(counts.values()), axis=0)
    rarity = {q: min(total[i] for i in np.flatnonzero(counts[q])) for q in qids}
    # rarest labels first, then larger queries first (they are the hard ones to fit); the seeded order breaks ties
    qids.sort(key=lambda q: (rarity[q], -counts[q].sum()))
    fractions = {"train": split.train, "val": split.val, "test": split.test}
    target = {s: f * total for s, f in fractions.items() if f > 0}
    need = {s: t.copy() for s, t in target.items()}
    need_pairs = {s: f * len(names) for s, f in fractions.items() if f > 0}
    assign = {}
    for q in qids:
        c = counts[q]

        def score(s):
            share = np.divide(need[s], target[s], out=np.zeros_like(need[s]), where=target[s] > 0)
            return (float((c * share).sum()), need_pairs[s] / max(len(names), 1), rng.random())

        best = max(need, key=score)
        assign[q] = best
        need[best] -= c
        need_pairs[best] -= c.sum()
    out = {}
    for name in ("train", "val", "test"):
        idx = [i for i, q in enumerate(names) if assign[q] == name]
        out[name] = pairs.take(pa.array(idx, pa.int64()))
    return out


def label_support(splits: dict[str, pa.Table], label_codes: list[str]) -> dict[str, dict[str, int]]:
    """Pairs per label in each split (labels in config order)."""
    out = {}
    for name, table in splits.items():
        found = table.column("label").to_pylist()
        out[name] = {c: found.count(c) for c in label_codes}
    return out
