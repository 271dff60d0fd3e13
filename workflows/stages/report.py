"""The `report` stage, the last of `thinkbroad run`: RUN_DIR/report.md, metrics.json and PNG plots from whatever
stages have results (generation, teacher evaluation, the students, cross-validation, the ablation, benchmarks)."""
from __future__ import annotations

import json
from pathlib import Path

from workflows.artifacts import write_json_atomic
from workflows.config import RunConfig
from workflows.stages.common import log
from workflows.stages.probe import probes
from workflows.stages.verdicts import metrics_table, verdict_lines


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_report(cfg: RunConfig, run_dir: Path) -> Path:
    """RUN_DIR/report.md + metrics.json + PNG plots from whatever stages have results."""
    gen = _read(run_dir / "mpcot" / "stats.json")
    teacher = _read(run_dir / "teacher" / "eval.json")
    student = _read(run_dir / "student" / "metrics.json")
    bench = {p.stem: _read(p) for p in sorted((Path(__file__).resolve().parents[2] / "bench" / "results").glob("*.json"))}
    write_json_atomic({"config": cfg.name, "generation": gen, "teacher_eval": teacher,
                       "student": student and student["variants"], "benchmarks": bench}, run_dir / "metrics.json")
    from workflows.demo import report_lines

    lines = [f"# thinkbroad run `{cfg.name}`", "", *report_lines(run_dir, cfg)]
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if gen:
        lines += ["## MPCoT generation (teacher base model, training pairs)", "",
                  "| perspective | parse rate | accuracy |", "|---|---|---|"]
        lines += [f"| {k} | {v['parse_rate']:.1%} | {v['accuracy']:.1%} |" for k, v in gen["per_perspective"].items()]
        a = gen["agreement"]
        lines += ["", f"All perspectives agree on {a['all_perspectives_agree']:.0%} of pairs; "
                  f"{a['pairs_with_conflict']:.0%} are conflict samples.", ""]
    if teacher:
        models = teacher["models"]
        lines += [f"## Teacher: base vs SFT vs SFT+DPO ({teacher['split']}, {teacher['pairs']} pairs; accuracy / macro-F1)", "",
                  "| prompt | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for prompt in next(iter(models.values())):
            lines.append(f"| {prompt} | " + " | ".join(f"{m[prompt]['accuracy']:.1%} / {m[prompt]['macro_f1']:.2f}" for m in models.values()) + " |")
        lines += ["", "![teacher](plots/teacher.png)", ""]
        _bar(plots / "teacher.png", {tag: {p: v["accuracy"] for p, v in m.items()} for tag, m in models.items()}, "accuracy")
    if student:
        lines += student_sections(student, run_dir)
        _student_plot(plots / "student.png", student)
    cv = _read(run_dir / "student" / "cv" / "metrics.json")
    if cv:  # written by `distill` with distill.cv_folds > 1
        lines += [f"## Student variants under cross-validation ({cv['split']}: {cv['test_pairs']} test pairs)", "",
                  "Mean ± std over seeds of the pooled test macro-F1 (each pair predicted by the fold student that never "
                  "trained on it); verdicts paired by seed over the pooled pairs, 95% bootstrap interval.", "",
                  metrics_table(cv["variants"]), "", verdict_lines(cv["verdicts"], cv["vanilla_verdicts"]), ""]
    ablation = _read(run_dir / "student" / "ablation.json")
    if ablation:  # written by `thinkbroad ablate`, which is not part of the run
        lines += ["## Student ablation (λ sweep per target source, each perspective alone, SFT vs DPO teacher)", "",
                  f"Test split ({ablation['test_pairs']} pairs); Δ = test macro-F1 minus the λ = 0 student with the same "
                  "extractor and mode, paired by seed, 95% bootstrap interval over seeds and test pairs.", "",
                  (run_dir / "student" / "ablation.md").read_text().strip(), "", verdict_lines(ablation["verdicts"]), "",
                  *(["One perspective's targets alone against all three (the same variant otherwise):", "",
                     verdict_lines(ablation["perspective_verdicts"]), ""] if ablation.get("perspective_verdicts") else []),
                  "![ablation](student/ablation.png)", ""]
    lat = bench.get("student_latency")
    if lat:
        lines += ["## Latency (bench/student_latency.py)", "",
                  f"Student (vanilla) {lat['students']['none']['batch1_ms_per_pair']:.1f} ms per pair alone, "
                  f"{lat['students']['none']['batch16_ms_per_pair']:.2f} ms at batch 16; the three-perspective teacher is "
                  f"{lat['teacher_vs_student_batch1']:.0f}x slower alone and {lat['teacher_vs_student_batch16']:.0f}x at batch 16.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"report: {path}")
    return path


def student_sections(student: dict, run_dir: Path) -> list[str]:
    """report.md's student part: target informativeness, variants, paired verdicts, guidance diagnostics, fidelity."""
    lines = ["## Distillation targets: can they teach the label? (informativeness probe)", "",
             "5-fold cross-validated logistic regression from each perspective's rationale embeddings (the train "
             "targets the filter keeps) to the gold label; macro-F1 against always answering the majority label.", "",
             "| source | perspective | rows | label counts | probe macro-F1 | majority macro-F1 |", "|---|---|---|---|---|---|"]
    # every target source written so far (the ablation adds gold_conditioned, label_text, the other teacher)
    for source, probe in probes(run_dir).items():
        for name, p in probe.items():
            lines.append(f"| {source} | {name} | {p['rows']} | {p['label_counts']} | {p.get('macro_f1', float('nan')):.3f} | "
                         f"{p.get('majority_macro_f1', float('nan')):.3f} |")
    lines += ["", f"## Student variants (mean ± std over seeds; validation selects, test ({student['test_pairs']} pairs) is scored once)", "",
              metrics_table(student["variants"]), "", "![student](plots/student.png)", "",
              "**Paired verdicts** (test macro-F1 difference against the control, paired by seed, 95% bootstrap interval "
              "over seeds and test pairs; better or worse when it excludes 0, equivalent when it lies inside the margin, "
              "else not enough data to tell):", "",
              verdict_lines(student["verdicts"], student.get("vanilla_verdicts", {})), "",
              "**Guidance diagnostics** (one fixed training batch, at the start of the first and of the last epoch; "
              "grad ratio = |grad of λ·guidance| / |grad of CE| on the encoder's parameters):", "",
              "| variant | CE (init → last) | guidance (init → last) | λ·guidance / CE (last) | grad ratio (init → last) |",
              "|---|---|---|---|---|"]
    for name, d in student["diagnostics"].items():
        if "init_grad_ratio" in d:
            lines.append(f"| {name} | {d['init_ce']:.3f} → {d['last_ce']:.3f} | {d['init_guidance']:.3f} → {d['last_guidance']:.3f} | "
                         f"{d['last_guidance_share']:.3f} | {d['init_grad_ratio']:.3f} → {d['last_grad_ratio']:.3f} |")
    lines += ["", "**Latent fidelity on validation pairs** (never trained or selected on): mean cosine between the student's "
              "projected latent and the teacher's rationale embedding for the same pair, against the trivial predictor "
              "(that perspective's mean training target):", "", "| variant | perspective | student cos | trivial cos |", "|---|---|---|---|"]
    for name, d in student["diagnostics"].items():
        for k, f in d.get("fidelity", {}).items():
            lines.append(f"| {name} | {k} | {f['student_cos']:.3f} | {f['trivial_cos']:.3f} |")
    return lines + [""]


def _student_plot(path: Path, student: dict) -> None:
    """Left: validation and test macro-F1 per variant (mean, bars = std over seeds). Right: each paired verdict's
    mean difference with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(student["variants"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for i, split in enumerate(("val_macro_f1", "macro_f1")):
        stats = [student["variants"][n].get(split, {"mean": float("nan"), "std": 0}) for n in names]
        ax.errorbar([j + 0.15 * (2 * i - 1) for j in range(len(names))], [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                    fmt="o", capsize=3, label="validation" if i == 0 else "test")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("macro-F1 (mean ± std over seeds)")
    ax.legend(fontsize=8)
    v = student.get("verdicts", {})
    rows = list(v.items())
    bx.errorbar([r["mean_diff"] for _, r in rows], range(len(rows)),
                xerr=[[r["mean_diff"] - r["ci95"][0] for _, r in rows], [r["ci95"][1] - r["mean_diff"] for _, r in rows]],
                fmt="o", capsize=3)
    bx.axvline(0, color="gray", lw=1)
    bx.set_yticks(range(len(rows)), [f"{n}\nvs {r['against']}" for n, r in rows], fontsize=7)
    bx.set_xlabel("test macro-F1 difference (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bar(path: Path, series: dict[str, dict[str, float]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(5, len(cats) * 1.1), 3.5))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(cats))], [vals[c] for c in cats], width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(cats))], cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
