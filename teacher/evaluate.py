"""Scoring the teacher's judgements: accuracy and macro-F1 per perspective and overall."""
from __future__ import annotations

from sklearn.metrics import accuracy_score, f1_score

UNPARSED = "<unparsed>"


def score(gold: list[str], predicted: list[str | None], label_codes: list[str]) -> dict:
    """Unparsed answers count as wrong (they predict no label) but are not a class of their own."""
    pred = [p if p is not None else UNPARSED for p in predicted]
    if not gold:
        return {"n": 0, "accuracy": None, "macro_f1": None, "parse_rate": None}
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=label_codes, average="macro", zero_division=0)),
        "parse_rate": sum(p is not None for p in predicted) / len(predicted),
    }


def score_judgements(rows: list[dict], label_codes: list[str]) -> dict:
    """Rationale rows (generation-stage schema) -> {perspective: scores, ..., "all": scores}."""
    out = {}
    for name in dict.fromkeys(r["perspective"] for r in rows):
        mine = [r for r in rows if r["perspective"] == name]
        out[name] = score([r["gold_label"] for r in mine], [r["predicted_label"] for r in mine], label_codes)
    out["all"] = score([r["gold_label"] for r in rows], [r["predicted_label"] for r in rows], label_codes)
    return out
