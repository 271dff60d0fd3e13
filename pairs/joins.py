"""The products and queries files joined to the pairs file: each pair takes the columns of the row whose key equals
its own; pairs without one fail or are dropped (data.missing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairs import source
from pairs.canonical import LINE, REC, RowPlan, mapped_fields
from pairs.config import DataConfig, JoinedFile
from pairs.errors import DataError, Problems, raise_problems
from pairs.runs import RunWriter
from pairs.source import Source

if TYPE_CHECKING:
    from pairs.scan import Scan

JOINED_NOUN = {"products": "product", "queries": "query"}  # data.<name>: what one row of that file is
KEY_SEP = "\x1f"  # joins the text of multi-column keys


@dataclass
class Joined:
    name: str  # "products" or "queries"
    spec: JoinedFile
    source: Source
    columns: list[str] = field(default_factory=list)  # the mapped columns read from this file
    duplicates: int = 0  # rows whose key an earlier row already has (the first one is used)



def join_key(t: pa.Table, on: list[str]) -> pa.Array:
    cols = [t.column(c).combine_chunks() for c in on]
    return cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, KEY_SEP)



def problems_of_kept(type_problems: list, kept_recs: np.ndarray, file_rank: int, problems: Problems) -> None:
    """The JSON type problems of the records a pair uses (a filtered-out pair, an unused product: none)."""
    kept = set(kept_recs.tolist()) if type_problems else set()
    for rec, order, message in type_problems:
        if rec in kept:
            problems.add((file_rank, rec, order), message)



def _join_keys(j: Joined) -> tuple[pa.Array, list[str]]:
    """Every row's key (text) in file order; rows whose key an earlier row has are counted, the first row wins."""
    parts = [join_key(batch, j.spec.on) for batch, _ in j.source.batches(j.spec.on)]
    raise_problems(j.source.parse_errors)
    keys = pa.chunked_array(parts, pa.string()).combine_chunks()
    counted = pa.table({"k": keys}).group_by("k").aggregate([("k", "count")])
    dup = counted.filter(pc.greater(counted.column("k_count"), 1))
    j.duplicates = int(pc.sum(dup.column("k_count")).as_py() or 0) - dup.num_rows
    examples = [k.replace(KEY_SEP, ", ") for k in dup.column("k").slice(0, 3).to_pylist()]
    return keys, examples


def join_and_build(data: DataConfig, pairs: Source, joined: list[Joined], side: pa.Table, plan: RowPlan,
                    writer: RunWriter, problems: Problems, scan: Scan) -> None:
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
        positions[j.name] = pc.index_in(join_key(side, j.spec.on), value_set=keys)
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
            json_fields = {f: col for f, col in mapped_fields(data.columns).items() if col in j.columns}
            parts = []
            for batch, type_problems in j.source.batches(j.columns, json_fields):
                problems_of_kept(type_problems, used, 1, problems)
                parts.append(batch.drop_columns([LINE, REC]))
            gathered = pa.concat_tables(parts).take(positions["queries"])
            for col in j.columns:
                side = side.append_column(col, gathered.column(col))
    products = next((j for j in joined if j.name == "products"), None)
    if products is None:
        for start in range(0, side.num_rows, source.BATCH_ROWS):
            writer.add(plan.build(side.slice(start, source.BATCH_ROWS), problems))
        return
    pos = positions["products"].to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(pos, kind="stable")
    sorted_pos = pos[order]
    json_fields = {f: col for f, col in mapped_fields(data.columns).items() if col in products.columns}
    for batch, type_problems in products.source.batches(products.columns, json_fields):
        if not batch.num_rows:
            continue
        lo, hi = batch.column(REC)[0].as_py(), batch.column(REC)[-1].as_py() + 1
        a, b = np.searchsorted(sorted_pos, [lo, hi])
        if a == b:
            continue
        rows = order[a:b]
        used = np.unique(sorted_pos[a:b])
        problems_of_kept(type_problems, used, 2, problems)
        part = side.take(pa.array(rows))
        gathered = batch.take(pa.array(sorted_pos[a:b] - lo))
        for col in products.columns:
            part = part.append_column(col, gathered.column(col))
        writer.add(plan.build(part, problems))
