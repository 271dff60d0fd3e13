"""Shaping the teacher's training tables: label balancing for SFT."""
from __future__ import annotations

import random


def balance_by_label(labels: list[str], mode: str, cap: int | None, seed: int) -> tuple[list[int], dict]:
    """Small teachers are biased (SmolLM2 says "E" for most pairs), so their correct rationales are too.

    `labels`: each row's label. none: every row. cap: at most `cap` rows per label (a seeded sample). upsample:
    repeat each label's rows (seeded) until it has as many as the most frequent label. Returns the indices of the
    rows to train on, shuffled (seeded), and the label counts before/after.
    """
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    before = {k: len(v) for k, v in sorted(by_label.items())}
    rng = random.Random(seed)
    if mode == "cap":
        if cap is None:
            raise ValueError("sft.balance is 'cap' but sft.cap_per_label is not set")
        by_label = {k: (rng.sample(v, cap) if len(v) > cap else v) for k, v in by_label.items()}
    elif mode == "upsample" and by_label:
        top = max(len(v) for v in by_label.values())
        by_label = {k: v + [rng.choice(v) for _ in range(top - len(v))] for k, v in by_label.items()}
    elif mode != "none":
        raise ValueError(f"unknown balance mode {mode!r}")
    out = [i for k in sorted(by_label) for i in by_label[k]]
    rng.shuffle(out)
    return out, {"before": before, "after": {k: len(v) for k, v in sorted(by_label.items())}}
