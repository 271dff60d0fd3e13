"""`thinkbroad ablate`: the lambda sweep per target source, each perspective's targets alone, and the SFT vs DPO
teacher; every LRKD variant paired with its lambda = 0 control -> RUN_DIR/student/ablation.{json,csv,md,png}."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from workflows.artifacts import write_json_atomic, write_text_atomic
from workflows.cards import summarise_cards
from workflows.config import RunConfig
from workflows.stages.common import log
from workflows.stages.probe import probes
from workflows.stages.students import train_variant_sets
from workflows.stages.targets import teacher_tag
from workflows.stages.verdicts import variant_report


def _other_teacher(cfg: RunConfig, run_dir: Path) -> str | None:
    """The SFT teacher when the student learns from DPO (or the reverse, when a DPO model exists): the ablation's
    teacher comparison. None for a base or folder teacher."""
    other = {"dpo": "sft", "sft": "dpo"}.get(cfg.distill.teacher)
    return other if other and (run_dir / "teacher" / other / "manifest.json").exists() else None


def ablate(cfg: RunConfig, run_dir: Path) -> Path:
    """The lambda sweep per target source, each perspective alone, SFT vs DPO teacher; each LRKD variant paired
    with lambda = 0 -> RUN_DIR/student/ablation.{json,csv,md,png}."""
    d = cfg.distill
    persp = [p.name for p in cfg.perspectives]
    sets = [(d.ablation_variants(persp), None, None)]
    variants = {v.name: v for v in d.ablation_variants(persp)}
    other = _other_teacher(cfg, run_dir) if d.ablate_teacher and d.target_source != "label_text" else None
    if other:  # the default LRKD variant, learning from the other teacher's rationales
        default = [d.lrkd(d.default_extractor, d.default_mode, d.lam, s) for s in d.seeds]
        variants[default[0].name] = default[0]
        sets.append((default, other, None))
    runs = [r for runs in train_variant_sets(cfg, run_dir, sets) for r in runs]  # one worker group for all
    report = variant_report(cfg, run_dir, runs) | {"probes": probes(run_dir)}
    out = run_dir / "student"
    write_json_atomic(report, out / "ablation.json")
    summarise_cards(run_dir, report, "ablation.json")
    tag = teacher_tag(cfg, other)
    rows = []
    for name, s in report["variants"].items():
        by_other = bool(other) and name.endswith(tag)
        v = variants[name.removesuffix(tag) if by_other else name]
        verdict, diag = report["verdicts"].get(name, {}), report["diagnostics"].get(name, {})
        low, high = verdict.get("ci95") or (None, None)
        rows.append({
            "variant": name, "lambda": v.lam, "source": v.target_source or "",
            "perspectives": "" if v.lam == 0 else "+".join(v.target_perspectives or ["all"]),
            "teacher": other if by_other else d.teacher if v.target_source in ("teacher", "gold_conditioned") else "",
            "seeds": len(s["seeds"]), "macro_f1_mean": s["macro_f1"]["mean"], "macro_f1_std": s["macro_f1"]["std"],
            "val_macro_f1_mean": s.get("val_macro_f1", {}).get("mean"),
            "diff_vs_lam0": verdict.get("mean_diff"), "ci_low": low, "ci_high": high, "verdict": verdict.get("verdict", ""),
            "grad_ratio_init": diag.get("init_grad_ratio"), "guidance_share_last": diag.get("last_guidance_share"),
            "fidelity_gain": _mean_gain(diag.get("fidelity")),
        })
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(buf.getvalue(), out / "ablation.csv")
    write_text_atomic(ablation_table(rows) + "\n", out / "ablation.md")
    _plot(rows, out / "ablation.png")
    log(f"ablation: {len(rows)} variants -> {out / 'ablation.csv'}, ablation.md, ablation.png")
    return out / "ablation.csv"


def _mean_gain(fidelity: dict | None) -> float | None:
    if not fidelity:
        return None
    return float(np.mean([v["student_cos"] - v["trivial_cos"] for v in fidelity.values()]))


def _fmt(x, spec: str = ".3f") -> str:
    return "" if x is None else format(x, spec)


def ablation_table(rows: list[dict]) -> str:
    lines = ["| variant | source | λ | perspectives | teacher | val macro-F1 | test macro-F1 | Δ vs λ = 0 [95% CI] | verdict | grad ratio (init) | fidelity gain (val) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"{r['diff_vs_lam0']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if r["diff_vs_lam0"] is not None else ""
        lines.append(f"| {r['variant']} | {r['source']} | {r['lambda']:g} | {r['perspectives']} | {r['teacher']} | "
                     f"{_fmt(r['val_macro_f1_mean'])} | "
                     f"{r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f} | {ci} | {r['verdict']} | "
                     f"{_fmt(r['grad_ratio_init'], '.2f')} | {_fmt(r['fidelity_gain'], '+.3f')} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    """Δ test macro-F1 against lambda = 0 with 95% intervals: one line per target source over lambda, and the
    single-perspective and other-teacher variants as separate points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    sweep = [r for r in rows if r["diff_vs_lam0"] is not None and r["perspectives"] == "all"]
    for i, (source, teacher) in enumerate(sorted({(r["source"], r["teacher"]) for r in sweep})):
        pts = sorted((r["lambda"], r["diff_vs_lam0"], r["ci_low"], r["ci_high"]) for r in sweep
                     if r["source"] == source and r["teacher"] == teacher)
        x = [p[0] * (1 + 0.04 * i) for p in pts]  # a small offset so the intervals do not overlap
        ax.errorbar(x, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                    marker="o", capsize=3, label=f"{source}" + (f" ({teacher} teacher)" if teacher else ""))
    for r in rows:
        if r["diff_vs_lam0"] is not None and r["perspectives"] not in ("all", ""):
            ax.errorbar([r["lambda"]], [r["diff_vs_lam0"]], yerr=[[r["diff_vs_lam0"] - r["ci_low"]], [r["ci_high"] - r["diff_vs_lam0"]]],
                        marker="*", ms=9, capsize=3, ls="none", label=f"only {r['perspectives']}")
    ax.axhline(0, color="gray", lw=1)
    ax.set_xscale("symlog", linthresh=0.03)
    ax.set_xlabel("lambda (guidance weight)")
    ax.set_ylabel("test macro-F1 minus lambda = 0 (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
