"""The comparisons of the student stages: per variant the metrics over seeds, each variant against its control paired
by seed (bootstrap interval and verdict), the guidance diagnostics; and the tables the log and the report print.
Used by distill (students.py), its cross-validated form (cv.py), ablate and the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from student.evaluate import aggregate, paired_bootstrap
from workflows.config import RunConfig
from workflows.stages.prepare import prepare


def _twin(name: str) -> str | None:
    """The lambda = 0 control of an LRKD variant: the same extractor and mode (lrkd-<ext>-<mode>-lam0)."""
    parts = name.split("-")
    if parts[0] != "lrkd" or name.endswith("-lam0"):
        return None
    return "-".join(parts[:3]) + "-lam0"


def verdicts(runs: list[dict], codes: list[str], resamples: int, test: pa.Table | list[pa.Table],
             against: dict[str, str] | None = None, margin: float = 0.02) -> dict:
    """Paired by seed on the test split (`test`: its pair_id and label columns): mean macro-F1 difference with a
    bootstrap 95% interval and a verdict, for each variant -> control in `against` (default: every LRKD variant
    against its lambda = 0 twin, and logit-KD against vanilla). Each run's predictions are read from its scored
    parts joined on pair_id (an error if they do not cover the split pair for pair).

    Cross-validation: `test` is every fold's test table and each run's "predictions" the list of its folds' scored
    folders, in fold order; the folds' pairs are pooled."""
    from student.score import aligned_predictions

    tests = test if isinstance(test, list) else [test]
    ids = [t.column("pair_id").combine_chunks() for t in tests]
    test_gold = [codes.index(c) for t in tests for c in t.column("label").to_pylist()]
    preds: dict[str, dict[int, list[int]]] = {}
    for r in runs:
        folders = r["predictions"] if isinstance(r["predictions"], list) else [r["predictions"]]
        if len(folders) != len(ids):
            raise ValueError(f"{r['variant']} seed {r['seed']}: predictions of {len(folders)} folds, {len(ids)} test sets")
        preds.setdefault(r["variant"], {})[r["seed"]] = np.concatenate(
            [aligned_predictions(f, i, codes) for f, i in zip(folders, ids)]).tolist()
    if against is None:
        against = {name: _twin(name) for name in preds} | {"logit_kd": "vanilla"}
    out = {}
    for name, base in against.items():
        if base and name in preds and base in preds:
            out[name] = {"against": base, **paired_bootstrap(test_gold, preds[name], preds[base], len(codes), resamples,
                                                             margin=margin)}
    return out


def _summaries(runs: list[dict]) -> dict:
    """Per variant, mean over seeds of the last epoch's diagnostics and of the fidelity gain."""
    out: dict[str, dict] = {}
    for r in runs:
        m, s = r["metrics"], out.setdefault(r["variant"], {"n": 0})
        s["n"] += 1
        for k, v in (m.get("diagnostics") or {}).get("first_epoch", {}).items():
            if k != "epoch":
                s[f"init_{k}"] = s.get(f"init_{k}", 0.0) + v
        for k, v in (m.get("diagnostics") or {}).get("last_epoch", {}).items():
            if k != "epoch":
                s[f"last_{k}"] = s.get(f"last_{k}", 0.0) + v
        fid = m.get("fidelity") or {}
        for k, v in fid.items():
            if isinstance(v, dict):
                s.setdefault("fidelity", {}).setdefault(k, {"student_cos": 0.0, "trivial_cos": 0.0})
                s["fidelity"][k]["student_cos"] += v["student_cos"]
                s["fidelity"][k]["trivial_cos"] += v["trivial_cos"]
    for s in out.values():
        n = s.pop("n")
        for k in list(s):
            if k != "fidelity":
                s[k] /= n
        for v in s.get("fidelity", {}).values():
            v["student_cos"] /= n
            v["trivial_cos"] /= n
    return out


def variant_report(cfg: RunConfig, run_dir: Path, runs: list[dict]) -> dict:
    codes = [lab.name for lab in cfg.labels]
    test = pq.read_table(prepare(cfg, run_dir)["test"], columns=["pair_id", "label"])
    names = {r["variant"] for r in runs}
    # one perspective's targets alone against all three (the same variant otherwise)
    alone = {n: n.split("-only_")[0] for n in names if "-only_" in n}
    return {"split": "test", "test_pairs": test.num_rows, "variants": aggregate(runs, codes),
            "verdicts": verdicts(runs, codes, cfg.distill.bootstrap_resamples, test, margin=cfg.distill.equivalence_margin),
            "perspective_verdicts": verdicts(runs, codes, cfg.distill.bootstrap_resamples, test, alone,
                                             cfg.distill.equivalence_margin) if alone else {},
            "vanilla_verdicts": verdicts(runs, codes, cfg.distill.bootstrap_resamples, test, against_vanilla(names),
                                         cfg.distill.equivalence_margin),
            "diagnostics": _summaries(runs), "runs": runs}


def against_vanilla(names) -> dict[str, str]:
    """Every LRKD variant with guidance (lambda > 0) against the plain cross-encoder: the comparison a user deciding
    whether to distil at all makes (the lambda = 0 twin isolates the guidance term; vanilla is the baseline)."""
    return {n: "vanilla" for n in sorted(names) if n.startswith("lrkd-") and not n.endswith("-lam0") and "vanilla" in names}


def verdict_lines(*groups: dict) -> str:
    return "\n".join(f"- {name} vs {r['against']}: {r['mean_diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] over "
                     f"{len(r['seeds'])} seeds x {r['test_pairs']} test pairs: {r['verdict']}"
                     for v in groups for name, r in v.items())


def metrics_table(agg: dict) -> str:
    labels = list(next(iter(agg.values()))["per_class_f1"])
    head = ("| variant | seeds | val macro-F1 | test accuracy | test macro-F1 | test nDCG@10 | "
            + " | ".join(f"F1 {lab}" for lab in labels) + " |")
    lines = [head, "|" + "---|" * (6 + len(labels))]
    for name, s in agg.items():
        cells = " | ".join(f"{s['per_class_f1'][lab]['mean']:.3f}" for lab in labels)
        val = f"{s['val_macro_f1']['mean']:.3f} ± {s['val_macro_f1']['std']:.3f}" if "val_macro_f1" in s else ""
        ndcg = f"{s['ndcg@10']['mean']:.3f} ± {s['ndcg@10']['std']:.3f}" if "ndcg@10" in s else ""
        lines.append(f"| {name} | {len(s['seeds'])} | {val} | {s['accuracy']['mean']:.3f} ± {s['accuracy']['std']:.3f} | "
                     f"{s['macro_f1']['mean']:.3f} ± {s['macro_f1']['std']:.3f} | {ndcg} | {cells} |")
    return "\n".join(lines)
