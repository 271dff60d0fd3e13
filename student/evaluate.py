"""Student evaluation: accuracy, macro-F1, per-class F1, confusion matrix, per-perspective attribution, latent
fidelity to the teacher's reasoning; the mean +- std over seeds, and the paired bootstrap verdict of one variant
against another."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from student.train import predict


def evaluate(model, data: dict, tok, labels: list[str], perspectives: list[str], max_length: int, device="cpu",
             out: dict | None = None) -> dict:
    """Metrics of `model` on `data` (or of its predictions `out` from `predict`), with the per-pair predictions
    that paired comparisons resample."""
    out = out or predict(model, data, tok, max_length, device=device)
    gold = data["label"].numpy()
    pred = out["probs"].argmax(-1).numpy()
    idx = list(range(len(labels)))
    result = {
        "n": int(len(gold)),
        "predictions": pred.tolist(),
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


def latent_fidelity(projected, targets, target_mask, train_targets, train_mask, mode: str,
                    perspectives: list[str]) -> dict:
    """How well the student predicts the teacher's reasoning on pairs it never trained on.

    projected (N, P, D) from `predict` on those pairs; targets (N, K, D) the teacher's rationale embeddings for
    them, target_mask (N, K). Per perspective: mean cosine between P(z) (slot k's projection in unified mode,
    head k in multi_teacher) and the teacher's embedding, against the trivial predictor that always answers that
    perspective's mean training target. In average mode the one projection is compared with the mean target.
    """
    import torch
    import torch.nn.functional as F

    def mean_target(t, m):
        return (t * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)

    if mode == "average":
        targets, target_mask = mean_target(targets, target_mask).unsqueeze(1), (target_mask.sum(1, keepdim=True) > 0).float()
        train_targets, train_mask = mean_target(train_targets, train_mask).unsqueeze(1), (train_mask.sum(1, keepdim=True) > 0).float()
        names = ["average"]
    else:
        names = list(perspectives)
    result = {}
    for k, name in enumerate(names):
        rows = target_mask[:, k] > 0
        train_rows = train_mask[:, k] > 0
        if not rows.any() or not train_rows.any():
            continue
        trivial = train_targets[train_rows, k].mean(0, keepdim=True)
        student = F.cosine_similarity(projected[rows, k], targets[rows, k], dim=-1)
        baseline = F.cosine_similarity(trivial.expand_as(targets[rows, k]), targets[rows, k], dim=-1)
        result[name] = {"n": int(rows.sum()), "student_cos": float(student.mean()), "trivial_cos": float(baseline.mean()),
                        "gain": float((student - baseline).mean()),
                        "share_beating_trivial": float((student > baseline).float().mean())}
    if result:
        result["mean_gain"] = float(torch.tensor([v["gain"] for v in result.values()]).mean())
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


def paired_bootstrap(gold: list[int], preds: dict[int, list[int]], base: dict[int, list[int]], num_classes: int,
                     resamples: int = 2000, seed: int = 0) -> dict:
    """Variant vs base, paired by seed on the same test pairs: mean macro-F1 difference over the shared seeds and
    a 95% percentile interval from resampling seeds and test pairs (both with replacement, the same pairs for both
    sides). Verdict: helps (interval above 0), hurts (below 0), no evidence (holds 0); with one seed the interval
    holds test-pair noise only, not seed-to-seed variation (which moves macro-F1 by as much on small sets), so the
    verdict is ONE_SEED whatever the interval says."""
    seeds = sorted(set(preds) & set(base))
    if not seeds:
        raise ValueError("no seed was trained for both variants; a paired comparison needs the same seeds")
    g = np.asarray(gold)
    a = np.asarray([preds[s] for s in seeds])
    b = np.asarray([base[s] for s in seeds])
    n, k = len(g), len(seeds)
    observed = float((macro_f1_fast(np.tile(g, (k, 1)), a, num_classes) - macro_f1_fast(np.tile(g, (k, 1)), b, num_classes)).mean())
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for i in range(resamples):
        s_idx = rng.integers(0, k, size=k)
        p_idx = rng.integers(0, n, size=n)
        gg = np.tile(g[p_idx], (k, 1))
        diffs[i] = (macro_f1_fast(gg, a[s_idx][:, p_idx], num_classes) - macro_f1_fast(gg, b[s_idx][:, p_idx], num_classes)).mean()
    low, high = (float(x) for x in np.percentile(diffs, [2.5, 97.5]))
    verdict = ONE_SEED if k < 2 else "helps" if low > 0 else "hurts" if high < 0 else "no evidence"
    return {"seeds": seeds, "test_pairs": n, "mean_diff": observed, "ci95": [low, high], "verdict": verdict}


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
            "per_class_f1": {lab: stat([r["metrics"]["per_class_f1"][lab] for r in rs]) for lab in labels},
        }
    return out
