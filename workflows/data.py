"""The one dataset reader: labelled (query, product) pairs from JSONL, CSV/TSV or Parquet, optionally joined with a
products file and a queries file (ESCI, WANDS as distributed) and filtered, validated, then split by query.

Canonical pair table (what every stage reads): pair_id, query_id, product_id, query, title,
attributes (JSON object string of the non-empty attributes), label (a label code).

Memory is bounded by the batch, not by the input: files are read in Arrow batches (`workflows.readers`), checks
are vectorised (Python only formats the messages of bad rows), and the canonical rows go to Parquet runs on disk
(`scan_pairs`), from which `write_splits` streams the split files. What stays in memory is a few small columns
per pair (ids, label, record number) and, with joins, the pairs file's own columns and the queries file.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflows.config import ColumnMap, DataConfig, JoinedFile, SplitConfig
from workflows import readers
from workflows.readers import (
    MAX_REPORTED,
    TEXT_FIELDS,
    DataError,
    Problems,
    Source,
    arrow_reads_as_text,
    detect_format,
    raise_problems,
    text_of,
)

__all__ = ["JOINED_NOUN", "PAIR_SCHEMA", "SPLITS", "DataError", "MAX_REPORTED", "TEXT_FIELDS", "Scan", "detect_format", "input_files",
           "label_support", "load_pairs", "publish_file", "scan_pairs", "split_by_query", "split_codes", "split_summary",
           "write_splits"]

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
SPLITS = ("train", "val", "test")
JOINED_NOUN = {"products": "product", "queries": "query"}  # data.<name>: what one row of that file is
REC, LINE, TEST = "__rec__", "__line__", "__test__"
RUN_ROW_GROUP = 4096  # rows per row group of a run: the merge holds about one of each run at a time
RUN_FORMAT = {"compression": "none", "use_dictionary": False}  # runs are read once, soon: no time spent encoding
RUN_BYTES = 64 << 20  # canonical rows buffered before a sorted run goes to disk (joined layouts)
ROW_GROUP_BYTES = 32 << 20  # rows buffered per split file before a row group is written
KEY_SEP = "\x1f"  # joins the text of multi-column keys
JOIN_MARK = "\x7f"  # DEL: JSON leaves it as it is; joins a batch of values escaped at once (see _json_escaped)
# the order of a row's problems in the listing (JSON type problems come first, numbered by field)
ORDER_QUERY, ORDER_TITLE, ORDER_LABEL, ORDER_PAIR_ID = 100, 101, 102, 103


def _mapped_fields(columns: ColumnMap) -> dict[str, str]:
    """field -> the column the config maps it to (attributes as `attributes.<name>`)."""
    fields = {f: getattr(columns, f) for f in ("query", "title", "label", "pair_id", "query_id", "product_id")}
    fields |= {f"attributes.{name}": col for name, col in columns.attributes.items()}
    return {f: col for f, col in fields.items() if col}


@dataclass
class _Joined:
    name: str  # "products" or "queries"
    spec: JoinedFile
    source: Source
    columns: list[str] = field(default_factory=list)  # the mapped columns read from this file
    duplicates: int = 0  # rows whose key an earlier row already has (the first one is used)


@dataclass
class Scan:
    """What `scan_pairs` read: the canonical rows as Parquet runs (each sorted by record), and per pair, in record
    order, the small columns the split and the checks need (`index`: pair_id, query_id, label, __rec__, __line__,
    and __test__ when a split column decides the test split)."""

    path: Path
    unit: str
    runs: list[Path]
    index: pa.Table
    rows_read: int = 0
    filtered_out: int = 0
    missing_dropped: dict[str, int] = field(default_factory=dict)
    joined_duplicates: dict[str, int] = field(default_factory=dict)

    def batches(self) -> Iterator[pa.Table]:
        """The canonical rows in record order (the order of the pairs file)."""
        yield from _merge_runs(self.runs)


class _Plan:
    """How the rows of one batch (pairs file columns + joined columns) become canonical rows."""

    def __init__(self, data: DataConfig, label_codes: list[str], source: Source, origin: dict[str, str],
                 labelled: bool = True):
        self.columns, self.codes, self.labelled = data.columns, label_codes, labelled
        self.by_lower = {c.lower(): c for c in label_codes}
        self.path, self.unit = source.path, source.unit
        self.origin = origin  # column -> the file it is read from, when that is not the pairs file
        self.split_column = data.split.column
        self.test_value = data.split.test_value.lower()

    def column_desc(self, col: str) -> str:
        return f"column {col!r}" + (f" of {self.origin[col]}" if col in self.origin else "")

    def build(self, t: pa.Table, problems: Problems) -> pa.Table:
        """Canonical columns + __rec__ (+ __test__); every problem of a row goes to `problems`."""
        c, n = self.columns, t.num_rows
        recs, lines = t.column(REC).to_numpy(), t.column(LINE)
        query, title, label_text = t.column(c.query).combine_chunks(), t.column(c.title).combine_chunks(), t.column(c.label).combine_chunks()
        where = lambda i: f"{self.path} {self.unit} {lines[i].as_py()}"  # noqa: E731

        def report(mask, order: int, message) -> None:
            bad = np.flatnonzero(np.asarray(mask, dtype=bool))
            first = bad[np.argsort(recs[bad], kind="stable")][:MAX_REPORTED]  # messages only for rows that may be listed
            problems.count += len(bad) - len(first)
            for i in first:
                key = (0, int(recs[i]), order)
                if problems.wants(key):
                    problems.add(key, f"{where(i)}: {message(i)}")
                else:
                    problems.count += 1

        report(_empty(query), ORDER_QUERY,
               lambda i: f"empty query ({self.column_desc(c.query)}); fill it in or remove the row")
        report(_empty(title), ORDER_TITLE,
               lambda i: f"empty product title ({self.column_desc(c.title)}); fill it in or remove the row")
        if self.labelled:
            codes, unknown = self._codes(label_text)
            report(_empty(label_text), ORDER_LABEL, lambda i: f"no label ({self.column_desc(c.label)}); give the pair "
                                                              f"one of {', '.join(self.codes)} or remove the row")
            report(unknown, ORDER_LABEL,
                   lambda i: f"label {label_text[i].as_py()!r} is not one of {', '.join(self.codes)}; fix the label or "
                             "add it to `labels` in the config")
        else:  # pairs to score, without a label column
            codes = pa.array([""] * n, pa.string())
        if c.pair_id:
            pair_id = t.column(c.pair_id).combine_chunks()
            report(_empty(pair_id), ORDER_PAIR_ID,
                   lambda i: f"empty pair id ({self.column_desc(c.pair_id)}); give every pair a unique id")
        else:
            pair_id = pc.binary_join_element_wise("row-", pc.add(t.column(REC), 1).cast(pa.string()), "").combine_chunks()
        query_id = t.column(c.query_id).combine_chunks() if c.query_id else pa.array([""] * n, pa.string())
        out = {
            "pair_id": pair_id,
            "query_id": _derive_query_ids(query_id, query),
            "product_id": t.column(c.product_id).combine_chunks() if c.product_id else pa.array([""] * n, pa.string()),
            "query": query,
            "title": title,
            "attributes": _attributes_json([(name, t.column(col)) for name, col in c.attributes.items()], n),
            "label": codes,
            REC: t.column(REC).combine_chunks(),
            LINE: lines.combine_chunks(),
        }
        if self.split_column:
            out[TEST] = pc.equal(pc.utf8_lower(t.column(self.split_column)), self.test_value).combine_chunks()
        return pa.table(out)

    def _codes(self, label_text: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Labels as the config's codes (case-insensitive), and which non-empty labels are not in the set."""
        enc = label_text.dictionary_encode()
        values = enc.dictionary.to_pylist()
        mapped = pa.array([self.by_lower.get(v.lower()) for v in values], pa.string())
        codes = mapped.take(enc.indices)
        bad = np.array([v != "" and self.by_lower.get(v.lower()) is None for v in values] + [False], dtype=bool)
        return codes, bad[enc.indices.to_numpy(zero_copy_only=False)] if len(enc.indices) else np.zeros(0, bool)


def _empty(arr: pa.Array) -> np.ndarray:
    return pc.equal(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False)


def _derive_query_ids(query_id: pa.Array, query: pa.Array) -> pa.Array:
    """An empty query id becomes the hash of the query text (ignoring case): pairs of one query share it."""
    missing = pc.equal(pc.binary_length(query_id), 0)
    if not pc.any(missing).as_py():
        return query_id
    enc = query.filter(missing).dictionary_encode()
    derived = pa.array(["q-" + hashlib.sha1(q.lower().encode()).hexdigest()[:12] for q in enc.dictionary.to_pylist()],
                       pa.string()).take(enc.indices)
    return pc.replace_with_mask(query_id, missing, derived)


def _json_escaped(col: pa.Array) -> pa.Array:
    """Every string as json.dumps(value, ensure_ascii=False) writes it between its quotes. The values that need it (a
    quote, a backslash, a control character) are escaped by Python's JSON encoder in one call per batch, joined by a
    character the encoder leaves alone (DEL); one call per value if a value holds that character."""
    needs = pc.match_substring_regex(col, r'[\x00-\x1f"\\]')
    if not pc.any(needs).as_py():
        return col
    sub = col.filter(needs)
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(sub)], pa.int32()), sub), JOIN_MARK)[0].as_py()
    if joined.count(JOIN_MARK) == len(sub) - 1:
        escaped = pc.split_pattern(pa.array([json.dumps(joined, ensure_ascii=False)[1:-1]], pa.string()), JOIN_MARK).values
    else:
        escaped = pa.array([json.dumps(v, ensure_ascii=False)[1:-1] for v in sub.to_pylist()], pa.string())
    return pc.replace_with_mask(col, needs, escaped)


def _attributes_json(attrs: list[tuple[str, pa.ChunkedArray]], n: int) -> pa.Array:
    """The JSON object of each row's non-empty attributes, in config order: what json.dumps(dict, ensure_ascii=False)
    writes."""
    pieces, seen = [], None
    for name, col in attrs:
        col = col.combine_chunks()
        present = pc.greater(pc.binary_length(col), 0)
        key = json.dumps(name, ensure_ascii=False) + ': "'
        lead = pa.scalar(key) if seen is None else pc.if_else(seen, ", " + key, key)
        # null where the attribute is empty: the piece is null, then left out of the row's object
        lead = pc.if_else(present, lead, pa.scalar(None, pa.string()))
        pieces.append(pc.binary_join_element_wise(lead, _json_escaped(col), '"', ""))
        seen = present if seen is None else pc.or_(seen, present)
    if not pieces:
        return pa.array(["{}"] * n, pa.string())
    return pc.binary_join_element_wise("{", *pieces, "}", "", null_handling="replace", null_replacement="")


def _key(t: pa.Table, on: list[str]) -> pa.Array:
    cols = [t.column(c).combine_chunks() for c in on]
    return cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, KEY_SEP)


def _filter_mask(t: pa.Table, filters: dict) -> pa.Array | None:
    mask = None
    for col, wanted in filters.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        allowed = pa.array(sorted({text_of(v).lower() for v in values}), pa.string())
        m = pc.is_in(pc.utf8_lower(t.column(col)), value_set=allowed)
        mask = m if mask is None else pc.and_(mask, m)
    return mask


def _problems_of_kept(type_problems: list, kept_recs: np.ndarray, file_rank: int, problems: Problems) -> None:
    """The JSON type problems of the records a pair uses (a filtered-out pair, an unused product: none)."""
    kept = set(kept_recs.tolist()) if type_problems else set()
    for rec, order, message in type_problems:
        if rec in kept:
            problems.add((file_rank, rec, order), message)


class _RunWriter:
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


def _merge_runs(runs: list[Path], batch_rows: int = 2048) -> Iterator[pa.Table]:
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


def scan_pairs(data: DataConfig, label_codes: list[str], workdir: Path, require_labels: bool = True) -> Scan:
    """Read, filter, join, map columns and validate every pair; raise DataError listing every problem. The canonical
    rows go to Parquet runs under `workdir` (nothing is written anywhere else). `require_labels=False` (pairs to
    score): a file without the label column is read with empty labels; one with it is checked as usual."""
    pairs = Source(data.path, data.format, "data.path", "your labelled pairs")
    joined = [_Joined(name, spec, Source(spec.path, spec.format, f"data.{name}.path", f"your {name} file"))
              for name, spec in (("queries", data.queries), ("products", data.products)) if spec]
    fields = _mapped_fields(data.columns)
    labelled = require_labels or data.columns.label in pairs.columns or any(
        data.columns.label in j.source.columns for j in joined)
    origin = _check_layout(data, fields, pairs, joined, labelled)
    plan = _Plan(data, label_codes, pairs, {col: str(j.source.path) for j in joined for col in j.columns}, labelled)
    problems = Problems()
    json_fields = {f: col for f, col in fields.items() if col not in origin}
    keys = [c for j in joined for c in j.spec.on]
    wanted = list(dict.fromkeys([col for col in fields.values() if col not in origin]
                                + keys + list(data.filter) + ([data.split.column] if data.split.column else [])))
    writer = _RunWriter(workdir, ordered=not any(j.name == "products" for j in joined))
    scan = Scan(pairs.path, pairs.unit, writer.runs, pa.table({}))
    kept_parts = []
    for batch, type_problems in pairs.batches(wanted, json_fields):
        scan.rows_read += batch.num_rows
        mask = _filter_mask(batch, data.filter)
        if mask is not None:
            before = batch.num_rows
            batch = batch.filter(mask)
            scan.filtered_out += before - batch.num_rows
        _problems_of_kept(type_problems, batch.column(REC).to_numpy(), 0, problems)
        if joined:
            kept_parts.append(batch)
        else:
            writer.add(plan.build(batch, problems))
    raise_problems(pairs.parse_errors)
    if not pairs.records:
        raise DataError(f"{pairs.path}: no rows; the file must hold at least one labelled pair")
    if scan.filtered_out == scan.rows_read:
        raise DataError(f"{pairs.path}: data.filter ({', '.join(f'{k}: {v}' for k, v in data.filter.items())}) keeps "
                        f"none of its {scan.rows_read} rows; check the values (compared as text, in any case)")
    if joined:
        _join_and_build(data, pairs, joined, pa.concat_tables(kept_parts), plan, writer, problems, scan)
    scan.index = writer.close()
    _check_duplicate_ids(scan, data.columns, problems)
    problems.raise_if_any()
    return scan


def _check_layout(data: DataConfig, fields: dict[str, str], pairs: Source, joined: list[_Joined],
                  labelled: bool = True) -> dict[str, str]:
    """Which file each mapped column is read from (column -> joined file name; absent: the pairs file), after checking
    that required columns, join keys, filter and split columns exist; the Parquet column types too."""
    errors = []
    required = {"query": data.columns.query, "title": data.columns.title} | ({"label": data.columns.label} if labelled else {})
    for f in ("pair_id", "query_id"):
        if getattr(data.columns, f):
            required[f] = getattr(data.columns, f)
    origin: dict[str, str] = {}
    for col in dict.fromkeys(fields.values()):
        # a joined file's key columns equal the pairs file's: they are read from the pairs file
        holders = [(None, pairs)] * (col in pairs.columns) + [
            (j, j.source) for j in joined if col in j.source.columns and col not in j.spec.on]
        if len(holders) > 1:
            errors.append(f"column {col!r} is in {' and '.join(str(s.path) for _, s in holders)}; rename it in all but "
                          "one of them, so that a mapped column has one source")
        elif holders and holders[0][0] is not None:
            origin[col] = holders[0][0].name
            holders[0][0].columns.append(col)
    missing = [f"{f} (column {col!r})" for f, col in required.items() if col not in pairs.columns and col not in origin]
    if missing:
        if joined:
            has = "; the files have: " + "; ".join(f"{s.path} {sorted(s.columns)}" for s in [pairs] + [j.source for j in joined])
        else:
            has = f"; the file has {sorted(pairs.columns)}"
        errors.insert(0, f"{pairs.path}: missing column(s) {', '.join(missing)}{has}. Fix the file or map the columns "
                         "under data.columns in the config")
    for j in joined:
        for col in j.spec.on:
            for s in (pairs, j.source):
                if col not in s.columns:
                    errors.append(f"{s.path}: no column {col!r} (data.{j.name}.on); the file has {sorted(s.columns)}. "
                                  f"Name in data.{j.name}.on the key columns both files share")
    for col in list(data.filter) + ([data.split.column] if data.split.column else []):
        if col not in pairs.columns:
            key = "data.split.column" if col == data.split.column and col not in data.filter else f"data.filter.{col}"
            errors.append(f"{pairs.path}: no column {col!r} ({key}); the file has {sorted(pairs.columns)}. "
                          f"{key.split('.')[1].capitalize()} columns are columns of the pairs file (data.path)")
    if errors:
        pairs.drain()  # a malformed record anywhere in the file is reported first, as when every record was read
        raise_problems(pairs.parse_errors)
        if not pairs.records:
            raise DataError(f"{pairs.path}: no rows; the file must hold at least one labelled pair")
        if len(errors) == 1:
            raise DataError(errors[0])
        raise_problems(errors)
    type_errors = []
    for s, cols in [(pairs, [c for c in fields.values() if c not in origin])] + [(j.source, j.columns) for j in joined]:
        if s.schema is None:
            continue
        type_errors += [
            f"{s.path}: column {col!r} ({f}) has type {s.schema.field(col).type}; {f} must be "
            f"{'a string' if f in TEXT_FIELDS else 'a string, number or list (of those)'} column. Write it as "
            f"one (decode bytes as UTF-8, take the text out of a struct) or map another column under data.columns.{f}"
            for f, col in fields.items() if col in cols and col in s.columns and not arrow_reads_as_text(f, s.schema.field(col).type)]
    raise_problems(type_errors)
    return origin


def _join_keys(j: _Joined) -> tuple[pa.Array, list[str]]:
    """Every row's key (text) in file order; rows whose key an earlier row has are counted, the first row wins."""
    parts = [_key(batch, j.spec.on) for batch, _ in j.source.batches(j.spec.on)]
    raise_problems(j.source.parse_errors)
    keys = pa.chunked_array(parts, pa.string()).combine_chunks()
    counted = pa.table({"k": keys}).group_by("k").aggregate([("k", "count")])
    dup = counted.filter(pc.greater(counted.column("k_count"), 1))
    j.duplicates = int(pc.sum(dup.column("k_count")).as_py() or 0) - dup.num_rows
    examples = [k.replace(KEY_SEP, ", ") for k in dup.column("k").slice(0, 3).to_pylist()]
    return keys, examples


def _join_and_build(data: DataConfig, pairs: Source, joined: list[_Joined], side: pa.Table, plan: _Plan,
                    writer: _RunWriter, problems: Problems, scan: Scan) -> None:
    """Look up each kept pair's query and product rows, apply the missing-row policy, then build the canonical rows:
    queries from memory, products by streaming the products file once more in its own order."""
    positions: dict[str, pa.Array] = {}
    for j in joined:
        keys, dup_examples = _join_keys(j)
        if j.duplicates:
            scan.joined_duplicates[j.name] = j.duplicates
            print(f"[thinkbroad] prepare: WARNING: {j.source.path}: {j.duplicates} row(s) repeat the key "
                  f"({', '.join(j.spec.on)}) of an earlier row, e.g. {'; '.join(dup_examples)}; the first row of each "
                  "key is used", flush=True)
        positions[j.name] = pc.index_in(_key(side, j.spec.on), value_set=keys)
    errors, missing_any = [], None
    for j in joined:
        missing = pc.is_null(positions[j.name])
        n = int(pc.sum(missing).as_py() or 0)
        if not n:
            continue
        missing_any = missing if missing_any is None else pc.or_(missing_any, missing)
        if data.missing == "drop":
            scan.missing_dropped[j.name] = n
            continue
        first = side.filter(missing).slice(0, 5)
        examples = "; ".join(f"{pairs.unit} {line} ({', '.join(f'{c} {v!r}' for c, v in zip(j.spec.on, vals))})"
                             for line, *vals in zip(first.column(LINE).to_pylist(), *(first.column(c).to_pylist() for c in j.spec.on)))
        noun = JOINED_NOUN[j.name]
        errors.append(f"{pairs.path}: {n} pair(s) name a {noun} that {j.source.path} lacks (no row with the same "
                      f"{', '.join(j.spec.on)}), e.g. {examples}; point data.{j.name}.path at the {noun} file of these "
                      f"pairs (and data.{j.name}.on at its key columns), or set data.missing: drop to leave such pairs "
                      "out (counted in the prepare manifest)")
    if errors:
        raise DataError("\n".join(errors))
    if missing_any is not None:
        keep = pc.invert(missing_any)
        side = side.filter(keep)
        positions = {name: pos.filter(keep) for name, pos in positions.items()}
    for j in joined:
        if j.name == "queries":
            used = np.unique(positions["queries"].to_numpy(zero_copy_only=False))
            json_fields = {f: col for f, col in _mapped_fields(data.columns).items() if col in j.columns}
            parts = []
            for batch, type_problems in j.source.batches(j.columns, json_fields):
                _problems_of_kept(type_problems, used, 1, problems)
                parts.append(batch.drop_columns([LINE, REC]))
            gathered = pa.concat_tables(parts).take(positions["queries"])
            for col in j.columns:
                side = side.append_column(col, gathered.column(col))
    products = next((j for j in joined if j.name == "products"), None)
    if products is None:
        for start in range(0, side.num_rows, readers.BATCH_ROWS):
            writer.add(plan.build(side.slice(start, readers.BATCH_ROWS), problems))
        return
    pos = positions["products"].to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(pos, kind="stable")
    sorted_pos = pos[order]
    json_fields = {f: col for f, col in _mapped_fields(data.columns).items() if col in products.columns}
    for batch, type_problems in products.source.batches(products.columns, json_fields):
        if not batch.num_rows:
            continue
        lo, hi = batch.column(REC)[0].as_py(), batch.column(REC)[-1].as_py() + 1
        a, b = np.searchsorted(sorted_pos, [lo, hi])
        if a == b:
            continue
        rows = order[a:b]
        used = np.unique(sorted_pos[a:b])
        _problems_of_kept(type_problems, used, 2, problems)
        part = side.take(pa.array(rows))
        gathered = batch.take(pa.array(sorted_pos[a:b] - lo))
        for col in products.columns:
            part = part.append_column(col, gathered.column(col))
        writer.add(plan.build(part, problems))


def _check_duplicate_ids(scan: Scan, columns: ColumnMap, problems: Problems) -> None:
    """A pair id seen before is a problem at every later row (named with the first row)."""
    if not columns.pair_id or not scan.index.num_rows:
        return
    ids = scan.index.select(["pair_id", REC, LINE]).filter(pc.greater(pc.binary_length(scan.index.column("pair_id")), 0))
    counted = ids.group_by("pair_id").aggregate([(REC, "count"), (REC, "min"), (LINE, "min")])
    dup = counted.filter(pc.greater(counted.column(f"{REC}_count"), 1))
    if not dup.num_rows:
        return
    rows = ids.join(dup, "pair_id").filter(pc.not_equal(pc.field(REC), pc.field(f"{REC}_min")))
    rows = rows.take(pc.sort_indices(rows, [(REC, "ascending")]))
    for i, (pid, rec, line, first) in enumerate(zip(*(rows.column(c).to_pylist() for c in ("pair_id", REC, LINE, f"{LINE}_min")))):
        key = (0, rec, ORDER_PAIR_ID)
        if i < MAX_REPORTED and problems.wants(key):
            problems.add(key, f"{scan.path} {scan.unit} {line}: duplicate pair id {pid!r} (first at {scan.unit} {first}); "
                              "pair ids must be unique")
        else:
            problems.count += 1


def load_pairs(path: str | Path, fmt: str, columns: ColumnMap, label_codes: list[str], require_labels: bool = True) -> pa.Table:
    """Read, map columns and validate every row of one file; raise DataError listing every problem. In memory: for
    files that fit (the stages stream through `scan_pairs`)."""
    import tempfile

    data = DataConfig(path=str(path), format=fmt, columns=columns)
    with tempfile.TemporaryDirectory(prefix="thinkbroad-pairs-") as work:
        scan = scan_pairs(data, label_codes, Path(work), require_labels)
        parts = [t.select(PAIR_SCHEMA.names) for t in scan.batches()]
    return pa.concat_tables(parts).cast(PAIR_SCHEMA) if parts else PAIR_SCHEMA.empty_table()


# ---- splits --------------------------------------------------------------------------------------------------------
def _stratified(query_ids: pa.Array, labels: pa.Array, split: SplitConfig) -> np.ndarray:
    """Per row, the index in SPLITS of its split (see split_by_query)."""
    n = len(query_ids)
    q, lab = (pc.dictionary_encode(a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a) for a in (query_ids, labels))
    qnames, lnames = q.dictionary.to_pylist(), lab.dictionary.to_pylist()
    classes = sorted(set(lnames))
    cls_of = np.array([classes.index(v) for v in lnames], dtype=np.int64)
    qi, ci = q.indices.to_numpy(zero_copy_only=False).astype(np.int64), cls_of[lab.indices.to_numpy(zero_copy_only=False)]
    k = len(classes)
    counts = np.bincount(qi * k + ci, minlength=len(qnames) * k).reshape(len(qnames), k).astype(np.float64)
    qids = sorted(range(len(qnames)), key=qnames.__getitem__)
    rng = random.Random(split.seed)
    rng.shuffle(qids)
    total = counts.sum(axis=0)
    rarity = np.where(counts > 0, total, np.inf).min(axis=1)
    sizes = counts.sum(axis=1)
    # rarest labels first, then larger queries first (they are the hard ones to fit); the seeded order breaks ties
    qids.sort(key=lambda i: (rarity[i], -sizes[i]))
    fractions = {"train": split.train, "val": split.val, "test": split.test}
    target = {s: f * total for s, f in fractions.items() if f > 0}
    need = {s: t.copy() for s, t in target.items()}
    need_pairs = {s: f * n for s, f in fractions.items() if f > 0}
    assign = np.zeros(len(qnames), dtype=np.int8)
    for i in qids:
        c = counts[i]

        def score(s):
            share = np.divide(need[s], target[s], out=np.zeros_like(need[s]), where=target[s] > 0)
            return (float((c * share).sum()), need_pairs[s] / max(n, 1), rng.random())

        best = max(need, key=score)
        assign[i] = SPLITS.index(best)
        need[best] -= c
        need_pairs[best] -= c.sum()
    return assign[qi]


def split_codes(index: pa.Table, split: SplitConfig, path: Path | str = "") -> np.ndarray:
    """Per row of `index` (query_id, label, and __test__ with a split column), the index in SPLITS of its split.

    Without a split column: split_by_query's stratified split. With one: its test rows are the test split, and
    train/val are drawn from the other rows the same way; a query with rows on both sides is an error."""
    if TEST not in index.column_names:
        return _stratified(index.column("query_id"), index.column("label"), split)
    test = index.column(TEST).to_numpy(zero_copy_only=False).astype(bool)
    qid = index.column("query_id")
    both = pc.is_in(pc.filter(qid, pa.array(test)), value_set=pc.unique(pc.filter(qid, pa.array(~test))))
    shared = pc.unique(pc.filter(pc.filter(qid, pa.array(test)), both))
    if len(shared):
        raise DataError(
            f"{path}: {len(shared)} quer(ies) have pairs both in the test split ({split.column} == {split.test_value!r}) "
            f"and outside it, e.g. query_id {', '.join(repr(q) for q in shared.slice(0, 5).to_pylist())}; a query must "
            f"be in one split: fix the {split.column!r} column, or remove data.split.column to split by query")
    codes = np.full(len(test), SPLITS.index("test"), dtype=np.int8)
    rest = pa.array(~test)
    if (~test).any():
        codes[~test] = _stratified(pc.filter(qid, rest), pc.filter(index.column("label"), rest), split)
    return codes


def split_by_query(pairs: pa.Table, split: SplitConfig) -> dict[str, pa.Table]:
    """Seeded query-disjoint split, stratified by label: every query's pairs land in one split, and each split's
    label counts follow the configured fractions as closely as whole queries allow.

    Iterative stratification (Sechidis et al., 2011) over query groups: queries holding the rarest labels are
    placed first (then the larger queries), each in the split that still needs the largest share of its labels (ties: the split that needs
    the most pairs, then a seeded coin). A rare class therefore reaches val and test whenever it spans enough
    queries; `label_support` tells whether it did.
    """
    codes = _stratified(pairs.column("query_id"), pairs.column("label"), split)
    return {name: pairs.filter(pa.array(codes == i)) for i, name in enumerate(SPLITS)}


def label_support(splits: dict[str, pa.Table], label_codes: list[str]) -> dict[str, dict[str, int]]:
    """Pairs per label in each split (labels in config order)."""
    out = {}
    for name, table in splits.items():
        counts = {v["values"]: v["counts"] for v in pc.value_counts(table.column("label")).to_pylist()}
        out[name] = {c: int(counts.get(c, 0)) for c in label_codes}
    return out


def publish_file(tmp: Path, path: Path) -> None:
    """The last step of writing an output file: rename its finished temp file over it."""
    os.replace(tmp, path)


def write_splits(scan: Scan, codes: np.ndarray, paths: dict[str, Path]) -> None:
    """Stream the canonical rows into the split files (the pairs file's order within each split): each is written
    to a temp file beside it, then renamed over it."""
    tmps = {s: p.with_name(f".{p.name}.{os.getpid()}.tmp") for s, p in paths.items()}
    for p in tmps.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    writers = {s: pq.ParquetWriter(tmps[s], PAIR_SCHEMA) for s in SPLITS}
    buffers: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    start = 0
    for batch in scan.batches():
        part = codes[start:start + batch.num_rows]
        start += batch.num_rows
        rows = batch.select(PAIR_SCHEMA.names)
        for i, s in enumerate(SPLITS):
            chosen = rows.filter(pa.array(part == i))
            if chosen.num_rows:
                buffers[s].append(chosen)
                sizes[s] += chosen.nbytes
            if sizes[s] >= ROW_GROUP_BYTES:
                writers[s].write_table(pa.concat_tables(buffers[s]))
                buffers[s], sizes[s] = [], 0
    for s in SPLITS:
        if buffers[s]:
            writers[s].write_table(pa.concat_tables(buffers[s]))
        writers[s].close()
    for s in SPLITS:
        publish_file(tmps[s], paths[s])


def input_files(data: DataConfig) -> list[Path]:
    """The files a prepared split depends on: the pairs file and the joined ones."""
    return [Path(data.path)] + [Path(spec.path) for spec in (data.queries, data.products) if spec]


def split_summary(index: pa.Table, codes: np.ndarray, label_codes: list[str]) -> tuple[dict, dict, dict]:
    """Per split: pairs, distinct queries, and pairs per label (labels in config order)."""
    counts, queries, support = {}, {}, {}
    for i, name in enumerate(SPLITS):
        part = index.filter(pa.array(codes == i))
        counts[name] = part.num_rows
        queries[name] = len(pc.unique(part.column("query_id")))
        found = {v["values"]: v["counts"] for v in pc.value_counts(part.column("label")).to_pylist()}
        support[name] = {c: int(found.get(c, 0)) for c in label_codes}
    return counts, queries, support
