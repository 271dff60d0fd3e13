"""The canonical pair table (what every stage reads): pair_id, query_id, product_id, query, title, attributes (JSON
object string of the non-empty attributes), label (a label code); and how the mapped columns of a batch become it.

Checks are vectorised: Python only formats the messages of bad rows."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairs.config import ColumnMap, DataConfig
from pairs.errors import MAX_REPORTED, Problems
from pairs.source import Source

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
REC, LINE, TEST = "__rec__", "__line__", "__test__"
JOIN_MARK = "\x7f"  # DEL: JSON leaves it as it is; joins a batch of values escaped at once (see _json_escaped)
# the order of a row's problems in the listing (JSON type problems come first, numbered by field)
ORDER_QUERY, ORDER_TITLE, ORDER_LABEL, ORDER_PAIR_ID = 100, 101, 102, 103


def mapped_fields(columns: ColumnMap) -> dict[str, str]:
    """field -> the column the config maps it to (attributes as `attributes.<name>`)."""
    fields = {f: getattr(columns, f) for f in ("query", "title", "label", "pair_id", "query_id", "product_id")}
    fields |= {f"attributes.{name}": col for name, col in columns.attributes.items()}
    return {f: col for f, col in fields.items() if col}



class RowPlan:
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
