"""The one dataset reader: labelled (query, product) pairs from JSONL, CSV/TSV or Parquet, optionally joined with a
products file and a queries file (ESCI, WANDS as distributed) and filtered, validated, into canonical rows.

Memory is bounded by the batch, not by the input: files are read in Arrow batches (`pairs.source`), checks are
vectorised (Python only formats the messages of bad rows), and the canonical rows go to Parquet runs on disk
(`scan_pairs`), from which `pairs.write.write_splits` streams the split files. What stays in memory is a few small
columns per pair (ids, label, record number) and, with joins, the pairs file's own columns and the queries file.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pairs.canonical import LINE, ORDER_PAIR_ID, PAIR_SCHEMA, REC, RowPlan, mapped_fields
from pairs.config import ColumnMap, DataConfig
from pairs.errors import MAX_REPORTED, DataError, Problems, raise_problems
from pairs.joins import Joined, join_and_build, problems_of_kept
from pairs.runs import RunWriter, merge_runs
from pairs.source import Source
from pairs.text import TEXT_FIELDS, arrow_reads_as_text, text_of

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
        yield from merge_runs(self.runs)



def _filter_mask(t: pa.Table, filters: dict) -> pa.Array | None:
    mask = None
    for col, wanted in filters.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        allowed = pa.array(sorted({text_of(v).lower() for v in values}), pa.string())
        m = pc.is_in(pc.utf8_lower(t.column(col)), value_set=allowed)
        mask = m if mask is None else pc.and_(mask, m)
    return mask



def scan_pairs(data: DataConfig, label_codes: list[str], workdir: Path, require_labels: bool = True) -> Scan:
    """Read, filter, join, map columns and validate every pair; raise DataError listing every problem. The canonical
    rows go to Parquet runs under `workdir` (nothing is written anywhere else). `require_labels=False` (pairs to
    score): a file without the label column is read with empty labels; one with it is checked as usual."""
    pairs = Source(data.path, data.format, "data.path", "your labelled pairs")
    joined = [Joined(name, spec, Source(spec.path, spec.format, f"data.{name}.path", f"your {name} file"))
              for name, spec in (("queries", data.queries), ("products", data.products)) if spec]
    fields = mapped_fields(data.columns)
    labelled = require_labels or data.columns.label in pairs.columns or any(
        data.columns.label in j.source.columns for j in joined)
    origin = _check_layout(data, fields, pairs, joined, labelled)
    plan = RowPlan(data, label_codes, pairs, {col: str(j.source.path) for j in joined for col in j.columns}, labelled)
    problems = Problems()
    json_fields = {f: col for f, col in fields.items() if col not in origin}
    keys = [c for j in joined for c in j.spec.on]
    wanted = list(dict.fromkeys([col for col in fields.values() if col not in origin]
                                + keys + list(data.filter) + ([data.split.column] if data.split.column else [])))
    writer = RunWriter(workdir, ordered=not any(j.name == "products" for j in joined))
    scan = Scan(pairs.path, pairs.unit, writer.runs, pa.table({}))
    kept_parts = []
    for batch, type_problems in pairs.batches(wanted, json_fields):
        scan.rows_read += batch.num_rows
        mask = _filter_mask(batch, data.filter)
        if mask is not None:
            before = batch.num_rows
            batch = batch.filter(mask)
            scan.filtered_out += before - batch.num_rows
        problems_of_kept(type_problems, batch.column(REC).to_numpy(), 0, problems)
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
        join_and_build(data, pairs, joined, pa.concat_tables(kept_parts), plan, writer, problems, scan)
    scan.index = writer.close()
    _check_duplicate_ids(scan, data.columns, problems)
    problems.raise_if_any()
    return scan


def _check_layout(data: DataConfig, fields: dict[str, str], pairs: Source, joined: list[Joined],
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
