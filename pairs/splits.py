"""Splitting pairs by query: seeded, query-disjoint, stratified by label; or by a split column for the test split."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairs.canonical import TEST
from pairs.config import SplitConfig
from pairs.errors import DataError

SPLITS = ("train", "val", "test")


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
