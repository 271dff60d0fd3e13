"""Student evaluation: accuracy, macro-F1, per-class F1, confusion matrix, per-perspective attribution; and the
mean +- std over seeds that the report compares."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from student.train import predict


def evaluate(model, data: dict, tok, labels: list[str], perspectives: list[str], max_length: int, device="cpu") -> dict:
    out = predict(model, data, tok, max_length, device=device)
    gold = data["label"].numpy()
    pred = out["probs"].argmax(-1).numpy()
    idx = list(range(len(labels)))
    result = {
        "n": int(len(gold)),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=idx, average="macro", zero_division=0)),
        "per_class_f1": dict(zip(labels, map(float, f1_score(gold, pred, labels=idx, average=None, zero_division=0)))),
        "confusion": {"labels": labels, "matrix": confusion_matrix(gold, pred, labels=idx).tolist()},
    }
    if out["perspective_scores"] is not None:
        # which perspective's centroid the latent is closest to, counted per gold class
        dominant = out["perspective_scores"].argmax(-1).numpy()
        result["attribution"] = {
            lab: {p: int(((gold == c) & (dominant == k)).sum()) for k, p in enumerate(perspectives)}
            for c, lab in enumerate(labels)
        }
    return result


def aggregate(runs: list[dict], labels: list[str]) -> dict:
    """runs: [{"variant": name, "seed": s, "metrics": evaluate(...)}] -> name -> mean/std per metric, seeds."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs in by.items():
        def stat(values):
            arr = np.array(values, dtype=float)
            return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}

        out[name] = {
            "seeds": [r["seed"] for r in rs],
            "accuracy": stat([r["metrics"]["accuracy"] for r in rs]),
            "macro_f1": stat([r["metrics"]["macro_f1"] for r in rs]),
            "per_class_f1": {lab: stat([r["metrics"]["per_class_f1"][lab] for r in rs]) for lab in labels},
        }
    return out
