"""Student inputs: cross-encoder text pairs, rationale-embedding targets and the teacher's label distribution."""
from __future__ import annotations

import json

import numpy as np
import torch

from mpcot.prompts import clean_text


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


def build_examples(pairs: list[dict], label_codes: list[str], perspectives: list[str],
                   targets: dict[tuple[str, str], np.ndarray] | None = None,
                   teacher_labels: dict[tuple[str, str], str | None] | None = None,
                   target_dim: int = 0, smoothing: float = 0.1) -> dict:
    """Column arrays for training: labels, targets (N, K, D) with a (pair, perspective) mask, and the teacher's
    label distribution with a per-pair mask.

    A missing (pair, perspective) target stays zero with target_mask 0 (the guidance term skips it); a pair with
    no vote from the teacher has has_votes 0 (the logit-KD term skips it). Only labels, targets and votes come
    from `pairs`' gold labels or the teacher: the student's inputs are `query` and `product` alone.
    """
    index = {c: i for i, c in enumerate(label_codes)}
    n, k, c = len(pairs), len(perspectives), len(label_codes)
    y = np.array([index[p["label"]] for p in pairs], dtype=np.int64)
    tgt = np.zeros((n, k, max(target_dim, 1)), dtype=np.float32)
    mask = np.zeros((n, k), dtype=np.float32)
    probs = np.full((n, c), 1.0 / c, dtype=np.float32)
    has_votes = np.zeros(n, dtype=np.float32)
    for i, p in enumerate(pairs):
        for j, name in enumerate(perspectives):
            vec = targets.get((p["pair_id"], name)) if targets is not None else None
            if vec is not None:
                tgt[i, j], mask[i, j] = vec, 1.0
        if teacher_labels is not None:
            votes = [teacher_labels.get((p["pair_id"], name)) for name in perspectives]
            votes = [v for v in votes if v in index]
            if votes:
                probs[i] = smoothing / c
                for v in votes:
                    probs[i, index[v]] += (1 - smoothing) / len(votes)
                has_votes[i] = 1.0
    return {
        "query": [p["query"] for p in pairs],
        "product": [product_text(p["title"], p.get("attributes")) for p in pairs],
        "label": torch.from_numpy(y),
        "targets": torch.from_numpy(tgt),
        "target_mask": torch.from_numpy(mask),
        "teacher_probs": torch.from_numpy(probs),
        "has_votes": torch.from_numpy(has_votes),
    }


def class_weights(labels: torch.Tensor, num_classes: int, scheme: str) -> torch.Tensor | None:
    """none, or inverse frequency (normalised to mean 1; absent classes get weight 0)."""
    if scheme == "none":
        return None
    if scheme != "inverse_frequency":
        raise ValueError(f"class_weighting must be none or inverse_frequency, not {scheme!r}")
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


def length_grouped_batches(lengths: list[int], batch_size: int, world: int, seed: int, chunk: int = 32) -> list[list[list[int]]]:
    """One epoch's batches for each of `world` ranks, with little padding.

    Shuffle, sort by token length inside windows of `chunk` batches (so a batch holds pairs of similar length and
    pads less), shuffle the batches, then deal them to the ranks. Every rank gets the same number of batches, so
    DDP's all-reduces stay in lockstep; the few left over (fewer than `world`) wait for the next epoch's shuffle.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    window = batch_size * chunk
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world
    if per_rank == 0:  # fewer pairs than ranks x batch size: one small batch each
        return [[order[r::world].tolist()] for r in range(world)]
    return [batches[r * per_rank : (r + 1) * per_rank] for r in range(world)]
