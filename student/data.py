"""Student inputs as Arrow rows, one per pair, and their collation into tensors.

The examples table (what training and scoring read; a Parquet dataset the student stage writes with Ray Data):
  pair_id, query_id   strings
  query, product      the two texts the cross-encoder reads (`product_text`: title and attributes)
  label               int64 index into the label codes; -1 when the pair has no label (scoring new pairs)
  targets             fixed_size_list<float32>[K * D]: the rationale embedding of each perspective, zeros where absent
  target_mask         fixed_size_list<float32>[K]: 1 where that perspective has a target
  votes               fixed_size_list<int8>[K]: the teacher's label index per perspective, -1 where it gave none
The last three columns are present only when the variants that read the table need them (LRKD with lambda > 0:
targets; logit-KD: votes). Only labels, targets and votes come from the gold labels or the teacher; a pair's inputs
are its query and product text alone.

Collation tokenises a chunk once, then cuts it into batches of similar token length (less padding), shuffled.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from mpcot.prompts import clean_text

PAIR_COLUMNS = ["pair_id", "query_id", "query", "title", "attributes", "label"]


def product_text(title: str, attributes_json: str | None, max_attribute_chars: int = 200) -> str:
    """Title, then `name: value` for each attribute present, one cleaned line."""
    parts = [clean_text(title)]
    for name, value in json.loads(attributes_json or "{}").items():
        value = clean_text(value, max_attribute_chars)
        if value:
            parts.append(f"{name.replace('_', ' ')}: {value}")
    return " | ".join(parts)


def encode_pairs(tokenizer, queries: list[str], products: list[str], max_length: int) -> dict:
    """`[CLS] query [SEP] product [SEP]`, the product side truncated first."""
    return tokenizer(queries, products, truncation="longest_first", max_length=max_length, padding=True, return_tensors="pt")


def pair_rows(batch: pa.Table, codes: list[str]) -> pa.Table:
    """Canonical pairs (pairs.canonical's schema; `label` may be absent or null) -> the examples' base columns."""
    index = {c: i for i, c in enumerate(codes)}
    labels = batch.column("label").to_pylist() if "label" in batch.column_names else [None] * batch.num_rows
    labels = [lab or None for lab in labels]  # an unlabelled pair's label is null or empty
    unknown = sorted({lab for lab in labels if lab is not None and lab not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the student's labels {codes}")
    attrs = batch.column("attributes").to_pylist() if "attributes" in batch.column_names else [None] * batch.num_rows
    return pa.table({
        "pair_id": batch.column("pair_id"),
        "query_id": batch.column("query_id") if "query_id" in batch.column_names else batch.column("pair_id"),
        "query": batch.column("query"),
        "product": pa.array([product_text(t, a) for t, a in zip(batch.column("title").to_pylist(), attrs)], pa.string()),
        "label": pa.array([index[lab] if lab is not None else -1 for lab in labels], pa.int64()),
    })


def fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    """(N, width) numpy -> an Arrow fixed_size_list column (a numpy batch in Ray Data, not an object array)."""
    values = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), width)


def column_matrix(table: pa.Table, name: str, dtype=np.float32) -> np.ndarray:
    """A fixed_size_list column -> (N, width) numpy (respecting slices)."""
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(col), col.type.list_size)  # a writable copy


def examples_table(pairs: list[dict], codes: list[str], perspectives: list[str],
                   targets: dict[tuple[str, str], np.ndarray] | None = None,
                   votes: dict[tuple[str, str], str | None] | None = None, target_dim: int = 0) -> pa.Table:
    """A small examples table from Python rows (tests, benchmarks): pairs carry pair_id, query, title, label
    (attributes, query_id optional). The stage builds the same columns with Ray Data."""
    base = pair_rows(pa.Table.from_pylist([{"attributes": None, "query_id": p["pair_id"], **p} for p in pairs]).select(
        [c for c in PAIR_COLUMNS]), codes)
    n, k = len(pairs), len(perspectives)
    if targets is not None:
        tgt = np.zeros((n, k, max(target_dim, 1)), np.float32)
        mask = np.zeros((n, k), np.float32)
        for i, p in enumerate(pairs):
            for j, name in enumerate(perspectives):
                vec = targets.get((p["pair_id"], name))
                if vec is not None:
                    tgt[i, j], mask[i, j] = vec, 1.0
        base = base.append_column("targets", fixed_list(tgt, k * tgt.shape[-1])).append_column("target_mask", fixed_list(mask, k))
    if votes is not None:
        index = {c: i for i, c in enumerate(codes)}
        v = np.array([[index.get(votes.get((p["pair_id"], name)), -1) for name in perspectives] for p in pairs], np.int8)
        base = base.append_column("votes", fixed_list(v.reshape(n, k), k))
    return base


def teacher_distribution(votes: np.ndarray, num_labels: int, smoothing: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """votes (N, K) label indices (-1: none) -> the teacher's smoothed label distribution (N, C) and has_votes (N,)."""
    n = votes.shape[0]
    counts = np.zeros((n, num_labels), np.float32)
    for k in range(votes.shape[1]):
        ok = votes[:, k] >= 0
        np.add.at(counts, (np.flatnonzero(ok), votes[ok, k].astype(np.int64)), 1.0)
    total = counts.sum(1, keepdims=True)
    has = (total[:, 0] > 0).astype(np.float32)
    probs = np.where(total > 0, smoothing / num_labels + (1 - smoothing) * counts / np.maximum(total, 1), 1.0 / num_labels)
    return probs.astype(np.float32), has


class Collator:
    """Turns a chunk of example rows (a pyarrow Table) into a list of tensor batches: tokenised once, sorted by token
    length inside the chunk and cut into `batch_size` batches (pairs of similar length pad less), the batches in a
    seeded random order. `sort=False` keeps the chunk's order (one batch per `batch_size` rows)."""

    def __init__(self, tokenizer, max_length: int, num_labels: int, perspectives: int, batch_size: int,
                 seed: int | None = None, sort: bool = True):
        self.tok, self.max_length, self.num_labels, self.k = tokenizer, max_length, num_labels, perspectives
        self.batch_size, self.sort = batch_size, sort
        self.rng = np.random.default_rng(seed)

    def tokenize(self, table: pa.Table) -> dict:
        return self.tok(table.column("query").to_pylist(), table.column("product").to_pylist(),
                        truncation="longest_first", max_length=self.max_length)

    def order(self, enc: dict) -> list[np.ndarray]:
        n = len(enc["input_ids"])
        if not self.sort:
            return [np.arange(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        idx = np.argsort(lengths, kind="stable")
        batches = [idx[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        return [batches[i] for i in self.rng.permutation(len(batches))] if self.rng is not None else batches

    def __call__(self, table: pa.Table) -> list[dict]:
        enc = self.tokenize(table)
        cols = self.columns(table)
        out = []
        for idx in self.order(enc):
            batch = self.tok.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
            out.append(dict(batch) | {k: v[torch.from_numpy(idx)] for k, v in cols.items()} | {"rows": torch.from_numpy(idx)})
        return out

    def columns(self, table: pa.Table) -> dict:
        """label, targets (B, K, D), target_mask (B, K), teacher_probs (B, C), has_votes (B) as tensors; neutral values
        (no target, no vote) for the columns the table does not have."""
        n = table.num_rows
        out = {"label": torch.from_numpy(table.column("label").to_numpy().astype(np.int64))}
        if "targets" in table.column_names:
            t = column_matrix(table, "targets")
            out["targets"] = torch.from_numpy(t.reshape(n, self.k, -1))
            out["target_mask"] = torch.from_numpy(column_matrix(table, "target_mask"))
        else:
            out["targets"] = torch.zeros(n, self.k, 1)
            out["target_mask"] = torch.zeros(n, self.k)
        if "votes" in table.column_names:
            probs, has = teacher_distribution(column_matrix(table, "votes", np.int64), self.num_labels)
        else:
            probs, has = np.full((n, self.num_labels), 1.0 / self.num_labels, np.float32), np.zeros(n, np.float32)
        out["teacher_probs"], out["has_votes"] = torch.from_numpy(probs), torch.from_numpy(has)
        return out


def class_weights(counts, num_classes: int, scheme: str) -> torch.Tensor | None:
    """none, or inverse frequency (normalised to mean 1; absent classes get weight 0), from per-class pair counts."""
    if scheme == "none":
        return None
    if scheme != "inverse_frequency":
        raise ValueError(f"class_weighting must be none or inverse_frequency, not {scheme!r}")
    counts = torch.as_tensor(counts, dtype=torch.float32)
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()
