"""Student evaluation: accuracy, macro-F1, per-class F1, confusion matrix, per-perspective attribution, nDCG@10,
latent fidelity to the teacher's reasoning (per pair, so scoring actors compute it batch by batch); the mean +- std
over seeds, and the paired bootstrap verdict of one variant against another."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from student.predict import predict


def classification_metrics(gold: np.ndarray, pred: np.ndarray, labels: list[str], perspectives: list[str],
                           dominant: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1, per-class F1, the confusion matrix and the per-pair predictions that paired comparisons
    resample, from gold and predicted label indices; with `dominant` (the perspective whose centroid each pair's
    latent is closest to, -1 for none) the attribution counted per gold class."""
    idx = list(range(len(labels)))
    result = {
        "n": int(len(gold)),
        "predictions": pred.tolist(),
        "accuracy": float(accuracy_score(gold, pred)) if len(gold) else 0.0,
        "macro_f1": float(f1_score(gold, pred, labels=idx, average="macro", zero_division=0)),
        "per_class_f1": dict(zip(labels, map(float, f1_score(gold, pred, labels=idx, average=None, zero_division=0)))),
        "confusion": {"labels": labels, "matrix": confusion_matrix(gold, pred, labels=idx).tolist()},
    }
    if dominant is not None and (dominant >= 0).any():
        result["attribution"] = {
            lab: {p: int(((gold == c) & (dominant == k)).sum()) for k, p in enumerate(perspectives)}
            for c, lab in enumerate(labels)
        }
    return result


def evaluate(model, table, tok, labels: list[str], perspectives: list[str], max_length: int, device="cpu",
             out: dict | None = None) -> dict:
    """Metrics of `model` on an examples table (student/data.py; or of its predictions `out` from `predict`), in
    this process: for small tables (tests, benchmarks). The stage scores on Ray Data workers (student/score.py)."""
    out = out or predict(model, table, tok, max_length, device=device)
    gold = table.column("label").to_numpy()
    dominant = out["perspective_scores"].argmax(-1).numpy() if out["perspective_scores"] is not None else None
    return classification_metrics(gold, out["probs"].argmax(-1).numpy(), labels, perspectives, dominant)


def ndcg_at_k(query_ids, gains: np.ndarray, scores: np.ndarray, k: int = 10) -> dict:
    """Mean nDCG@k over queries, each query's pairs ranked by `scores` (ties: input order), with graded `gains`
    (ESCI: E 1.0, S 0.1, C 0.01, I 0). Queries with no gain above 0 have no ideal ranking and are counted apart."""
    q = np.asarray(pa.array(query_ids).dictionary_encode().indices.to_numpy(zero_copy_only=False))
    gains, scores = np.asarray(gains, np.float64), np.asarray(scores, np.float64)
    if not len(q):
        return {f"ndcg@{k}": None, "queries": 0, "queries_without_relevant": 0}
    disc = 1.0 / np.log2(np.arange(2, k + 2))

    def dcg(order_key: np.ndarray) -> np.ndarray:
        order = np.lexsort((np.arange(len(q)), -order_key, q))  # by query, then the key descending
        qs = q[order]
        starts = np.r_[0, np.flatnonzero(np.diff(qs)) + 1]
        rank = np.arange(len(qs)) - np.repeat(starts, np.diff(np.r_[starts, len(qs)]))
        keep = rank < k
        out = np.zeros(q.max() + 1)
        np.add.at(out, qs[keep], gains[order][keep] * disc[rank[keep]])
        return out

    actual, ideal = dcg(scores), dcg(gains)
    present = np.zeros(q.max() + 1, bool)
    present[q] = True
    has = present & (ideal > 0)
    return {f"ndcg@{k}": float((actual[has] / ideal[has]).mean()) if has.any() else None,
            "queries": int(has.sum()), "queries_without_relevant": int((present & ~has).sum())}


def fidelity_rows(projected: np.ndarray, targets: np.ndarray, mask: np.ndarray, trivial: np.ndarray,
                  mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair and projection head: cosine of the student's P(z) with the teacher's embedding, cosine of the
    trivial predictor (that perspective's mean training target) with it, and whether the pair has that target.
    projected (N, P, D), targets (N, K, D), mask (N, K), trivial (P, D). In average mode (P = 1) the one
    projection is compared with the pair's mean target."""
    if mode == "average":
        m = mask[..., None]
        targets = ((targets * m).sum(1) / np.maximum(m.sum(1), 1))[:, None]
        mask = (mask.sum(1, keepdims=True) > 0).astype(np.float32)

    def cos(a, b):
        return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-8)

    return cos(projected, targets), cos(np.broadcast_to(trivial, targets.shape), targets), mask > 0


def fidelity_summary(student_cos: np.ndarray, trivial_cos: np.ndarray, has: np.ndarray, names: list[str]) -> dict:
    """How well the student predicts the teacher's reasoning, from per-pair cosines (fidelity_rows, possibly computed
    batch by batch): per projection head, mean cosine of P(z) with the teacher's embedding against the trivial
    predictor's, their mean gain and the share of pairs where the student beats it."""
    result = {}
    for k, name in enumerate(names):
        rows = has[:, k]
        if not rows.any():
            continue
        s, t = student_cos[rows, k], trivial_cos[rows, k]
        result[name] = {"n": int(rows.sum()), "student_cos": float(s.mean()), "trivial_cos": float(t.mean()),
                        "gain": float((s - t).mean()), "share_beating_trivial": float((s > t).mean())}
    if result:
        result["mean_gain"] = float(np.mean([v["gain"] for v in result.values()]))
    return result


def macro_f1_fast(gold: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 over all classes (absent ones count 0, as `evaluate` does) for each row of pred (R, N) vs gold (R, N)."""
    r = gold.shape[0]
    cm = np.zeros((r, num_classes * num_classes), dtype=np.int64)
    flat = gold * num_classes + pred
    for i in range(r):
        cm[i] = np.bincount(flat[i], minlength=num_classes * num_classes)
    cm = cm.reshape(r, num_classes, num_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(1) + cm.sum(2)  # predicted + gold counts = 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=float), where=denom > 0)
    return f1.mean(1)


ONE_SEED = "no verdict (1 seed)"


def _macro_f1_cm(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 over all classes (absent ones count 0) from confusion matrices (..., C, C): rows gold, columns predicted."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(-1) + cm.sum(-2)
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=float), where=denom > 0).mean(-1)


def _poisson_bootstrap(gold: np.ndarray, a: np.ndarray, b: np.ndarray, num_classes: int, resamples: int, seed: int,
                       chunk: int = 4096) -> np.ndarray:
    """The bootstrap distribution of mean-over-resampled-seeds macro-F1(a) - macro-F1(b): each resample weighs every
    pair by a Poisson(1) draw (the same weights for both sides and every seed), accumulated into weighted confusion
    matrices chunk by chunk (resamples x seeds x C^2 numbers, whatever the pairs), then resamples the seeds."""
    c2 = num_classes * num_classes
    k = a.shape[0]
    cm_a, cm_b = np.zeros((resamples, k, c2)), np.zeros((resamples, k, c2))
    rng = np.random.default_rng(seed)
    eye = np.eye(c2, dtype=np.float32)
    for start in range(0, len(gold), chunk):
        g = gold[start : start + chunk]
        w = rng.poisson(1.0, size=(resamples, len(g))).astype(np.float32)
        for j in range(k):
            cm_a[:, j] += w @ eye[g * num_classes + a[j, start : start + chunk]]
            cm_b[:, j] += w @ eye[g * num_classes + b[j, start : start + chunk]]
    shape = (resamples, k, num_classes, num_classes)
    per_seed = _macro_f1_cm(cm_a.reshape(shape)) - _macro_f1_cm(cm_b.reshape(shape))  # (resamples, seeds)
    return np.take_along_axis(per_seed, rng.integers(0, k, size=(resamples, k)), axis=1).mean(1)


EQUIVALENCE_MARGIN = 0.02  # macro-F1: the default margin inside which two variants count as equivalent


def verdict_of(low: float, high: float, margin: float) -> str:
    """What a 95% interval of a difference (variant - base) says, against an equivalence margin:
    better / worse (the interval excludes 0), equivalent within +-margin (the whole interval inside it), else not
    enough data to tell (it holds 0 and reaches past the margin). "No evidence" is never "the same"."""
    if low > 0:
        return "better" + (f" (by less than {margin:g})" if high < margin else "")
    if high < 0:
        return "worse" + (f" (by less than {margin:g})" if low > -margin else "")
    if -margin < low and high < margin:
        return f"equivalent within ±{margin:g}"
    return f"not enough data to tell (the interval reaches past ±{margin:g})"


def paired_bootstrap(gold: list[int], preds: dict[int, list[int]], base: dict[int, list[int]], num_classes: int,
                     resamples: int = 2000, seed: int = 0, margin: float = EQUIVALENCE_MARGIN) -> dict:
    """Variant vs base, paired by seed on the same test pairs: mean macro-F1 difference over the shared seeds and
    a 95% percentile interval from resampling seeds and test pairs (both with replacement, the same pairs for both
    sides; pairs by Poisson(1) weights, chunk by chunk: memory does not grow with the pairs). Verdict (`verdict_of`): better, worse, equivalent within the margin, or not enough data to tell; with one
    seed the interval
    holds test-pair noise only, not seed-to-seed variation (which moves macro-F1 by as much on small sets), so the
    verdict is ONE_SEED whatever the interval says."""
    seeds = sorted(set(preds) & set(base))
    if not seeds:
        raise ValueError("no seed was trained for both variants; a paired comparison needs the same seeds")
    wrong = {f"seed {s}": (len(preds[s]), len(base[s])) for s in seeds if not len(preds[s]) == len(base[s]) == len(gold)}
    if wrong:
        raise ValueError(f"paired comparison on {len(gold)} test pairs, but the predictions (variant, base) number {wrong}: "
                         "each must hold one prediction per test pair, in the split's order")
    g = np.asarray(gold, np.int64)
    a = np.asarray([preds[s] for s in seeds], np.int64)
    b = np.asarray([base[s] for s in seeds], np.int64)
    n, k = len(g), len(seeds)
    observed = float((macro_f1_fast(np.tile(g, (k, 1)), a, num_classes) - macro_f1_fast(np.tile(g, (k, 1)), b, num_classes)).mean())
    diffs = _poisson_bootstrap(g, a, b, num_classes, resamples, seed)
    low, high = (float(x) for x in np.percentile(diffs, [2.5, 97.5]))
    verdict = ONE_SEED if k < 2 else verdict_of(low, high, margin)
    return {"seeds": seeds, "test_pairs": n, "mean_diff": observed, "ci95": [low, high], "margin": margin, "verdict": verdict}


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
            **({"val_macro_f1": stat([r["metrics"]["val"]["macro_f1"] for r in rs])} if all("val" in r["metrics"] for r in rs) else {}),
            **({"ndcg@10": stat([r["metrics"]["ranking"]["ndcg@10"] for r in rs])}
               if all((r["metrics"].get("ranking") or {}).get("ndcg@10") is not None for r in rs) else {}),
            "per_class_f1": {lab: stat([r["metrics"]["per_class_f1"][lab] for r in rs]) for lab in labels},
        }
    return out
