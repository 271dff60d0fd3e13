"""Scoring the teacher's judgements: accuracy and macro-F1 per perspective and overall.

Counted as (gold, predicted) tallies, so a judgement table of any size is scored one batch at a time."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def score(gold: list[str], predicted: list[str | None], label_codes: list[str]) -> dict:
    """Unparsed answers (None) count as wrong (they predict no label) but are not a class of their own."""
    return score_counts(Counter(zip(gold, predicted)), label_codes)


def score_counts(tally: Counter, label_codes: list[str]) -> dict:
    """`tally`: (gold, predicted or None) -> count. Macro-F1 over `label_codes`, a class with neither support nor
    predictions scoring 0 (scikit-learn's f1_score with zero_division=0)."""
    n = sum(tally.values())
    if not n:
        return {"n": 0, "accuracy": None, "macro_f1": None, "parse_rate": None}
    f1 = []
    for lab in label_codes:
        tp = tally[(lab, lab)]
        fp = sum(c for (g, p), c in tally.items() if p == lab and g != lab)
        fn = sum(c for (g, p), c in tally.items() if g == lab and p != lab)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "n": n,
        "accuracy": sum(c for (g, p), c in tally.items() if g == p) / n,
        "macro_f1": sum(f1) / len(f1),
        "parse_rate": sum(c for (_, p), c in tally.items() if p is not None) / n,
    }


def score_judgements(rows: Iterable[dict], label_codes: list[str]) -> dict:
    """Rationale rows (generation-stage schema; only perspective, gold_label and predicted_label are read, so an
    iterator over a dataset's batches works) -> {perspective: scores, ..., "all": scores}."""
    tallies: dict[str, Counter] = {}
    for r in rows:
        tallies.setdefault(r["perspective"], Counter())[(r["gold_label"], r["predicted_label"])] += 1
    out = {name: score_counts(t, label_codes) for name, t in tallies.items()}
    out["all"] = score_counts(sum(tallies.values(), Counter()), label_codes)
    return out
