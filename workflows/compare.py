"""`thinkbroad compare RUN_DIR...`: the students of several runs side by side, one row per (run, variant), from what
each run's student stage wrote: `student/metrics.json` (the main variants), `student/ablation.json` (the ablation's
other variants) or, for a cross-validated run, `student/cv/metrics.json`; the teacher, target source and λ of each
variant from its students' cards (`best/card.json`, workflows/cards.py); latency where bench/student_latency.py
measured it (student/card.py `measured_latency`). Markdown (stdout, `--out`) and a PNG of macro-F1 with intervals."""
from __future__ import annotations

import json
from pathlib import Path

from student.card import CARD_FACTS, model_size, measured_latency, seed_interval


class CompareError(ValueError):
    """A run folder compare cannot read; the message names it and the command that fills it."""


REPORTS = (("student/metrics.json", "distill"), ("student/cv/metrics.json", "distill (cross-validated)"),
           ("student/ablation.json", "ablate"))


def _reports(run_dir: Path) -> list[tuple[str, dict]]:
    found = [(rel, json.loads((run_dir / rel).read_text())) for rel, _ in REPORTS if (run_dir / rel).exists()]
    if not found:
        if not run_dir.is_dir():
            raise CompareError(f"{run_dir} is not a folder; give run folders (RUN_DIR of `thinkbroad run`)")
        raise CompareError(f"{run_dir} has no finished student stage: none of {', '.join(r for r, _ in REPORTS)} is "
                           f"there; run `thinkbroad distill --config CONFIG --run-dir {run_dir}` first")
    return found


def _student_folder(run: dict) -> Path:
    pred = run["predictions"][0] if isinstance(run["predictions"], list) else run["predictions"]
    return Path(pred).parent.parent / "best"


def _locate(best: Path, run_dir: Path) -> Path:
    """The student folder inside `run_dir`: metrics.json names the folders where the run was written, and a run
    folder that was moved or copied since keeps its layout below RUN_DIR/student."""
    if best.exists():
        return best
    parts = best.parts
    return run_dir.joinpath(*parts[parts.index("student"):]) if "student" in parts else best


def rows(run_dirs: list[str | Path]) -> list[dict]:
    """One row per (run, variant): every variant of a run's reports, each once (metrics.json before ablation.json)."""
    out = []
    for given in run_dirs:
        run_dir = Path(given)
        seen: set[str] = set()
        for rel, report in _reports(run_dir):
            verdicts = {}
            for group in ("verdicts", "vanilla_verdicts", "perspective_verdicts"):
                for name, v in (report.get(group) or {}).items():
                    verdicts.setdefault(name, v)  # the λ = 0 twin first: it isolates the guidance term
            for name in report["variants"]:
                if name in seen:
                    continue
                seen.add(name)
                runs = [r for r in report["runs"] if r["variant"] == name]
                f1 = seed_interval([r["metrics"]["macro_f1"] for r in runs])
                best = _locate(_student_folder(runs[0]), run_dir)
                facts = json.loads((best / CARD_FACTS).read_text()) if (best / CARD_FACTS).exists() else None
                agg = report["variants"][name]
                out.append({
                    "run": run_dir.name, "run_dir": str(run_dir), "report": rel, "variant": name, "seeds": f1["n"],
                    "macro_f1": f1, "val_macro_f1": (agg.get("val_macro_f1") or {}).get("mean"),
                    "ndcg@10": (agg.get("ndcg@10") or {}).get("mean"), "test_pairs": report["test_pairs"],
                    "verdict": verdicts.get(name), "facts": facts,
                    "latency": measured_latency(best, facts) if facts else None,
                })
    return out


def _teacher(facts: dict | None) -> str:
    if facts is None:
        return "n/a (no card.json)"
    t = facts["teacher"]
    if not t:
        return "none"
    size = f", {model_size(t['params'])}" if t["params"] else ""
    return f"{t['choice']} ({t['model']}{size})" if t["trained"] else f"{t['model']}{size}"


def _cells(r: dict) -> list[str]:
    f1, facts, v, lat = r["macro_f1"], r["facts"], r["verdict"], r["latency"]
    ci = f" [{f1['ci95'][0]:.3f}, {f1['ci95'][1]:.3f}]" if f1["ci95"] else ""
    verdict = (f"{v['mean_diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] vs {v['against']}: {v['verdict']}"
               if v else "")
    latency = "not measured" if not lat or lat["batch16_ms_per_pair"] is None else \
        f"{lat['batch16_ms_per_pair']:.2f} ms" + (" (architecture)" if lat["kind"] == "architecture" else "")
    lam = "n/a" if facts is None else "" if facts["lambda"] is None else f"{facts['lambda']:g}"
    source = "n/a" if facts is None else facts["target_source"] or ""
    fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    return [r["run"], r["variant"], str(r["seeds"]), f"{f1['mean']:.3f} ± {f1['std']:.3f}{ci}", verdict,
            fmt(r["val_macro_f1"]), fmt(r["ndcg@10"]), latency, _teacher(facts), source, lam,
            f"{r['test_pairs']} ({r['report']})"]


HEAD = ["run", "variant", "seeds", "test macro-F1 (mean ± std, 95% interval over seeds)", "paired Δ macro-F1 [95% CI]",
        "val macro-F1", "nDCG@10", "latency (batch 16, per pair)", "teacher", "target source", "λ", "test pairs (from)"]


def table(rs: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rs])


def plot(rs: list[dict], path: str | Path) -> Path:
    """Test macro-F1 per (run, variant): the mean over seeds with its 95% interval (a point alone with one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run_dir"] for r in rs))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rs) + 1.2))
    for i, r in enumerate(rs):
        f1 = r["macro_f1"]
        err = [[f1["mean"] - f1["ci95"][0]], [f1["ci95"][1] - f1["mean"]]] if f1["ci95"] else None
        ax.errorbar([f1["mean"]], [i], xerr=err, marker="o", capsize=3, color=f"C{runs.index(r['run_dir']) % 10}")
    ax.set_yticks(range(len(rs)), [f"{r['run']}: {r['variant']}" for r in rs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test macro-F1, mean over seeds (95% interval over seeds)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(run_dirs: list[str | Path], out: str | Path | None = None, png: str | Path | None = None) -> str:
    """The Markdown comparison; written to `out` when given, and the plot to `png` (default: `out` as .png)."""
    rs = rows(run_dirs)
    text = table(rs)
    png = png or (Path(out).with_suffix(".png") if out else None)
    if png:
        plot(rs, png)
        text += f"\n\n![test macro-F1 per run and variant]({Path(png).name if out and Path(png).parent == Path(out).parent else png})"
    text += ("\n\nIntervals: the test macro-F1 interval is a t-interval over seeds (seed-to-seed variation only); the "
             "paired Δ is the stage's verdict against the variant's control (λ = 0 twin, or vanilla), bootstrapped over "
             "seeds and test pairs. Latency: bench/student_latency.py, this student or (architecture) its backbone and "
             "extractor with random weights.\n")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
