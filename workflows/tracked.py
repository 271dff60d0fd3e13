"""What each finished stage of a run directory puts in MLflow (workflows/tracking.py logs it): read from the files
the stage wrote, never from its memory, so the store holds exactly the numbers of metrics.json, history.json and
the rest.

A `Record` is one nested MLflow run: a stage (prepare, generate, sft, dpo, teacher_eval, distill, ablate, report) or
one student (a folder under student/.../variants/). Its `key` is a hash of what makes the result: the stage's
manifest (config hash, input fingerprints, when it finished) or, for the stages without one, the content of the
files it wrote. A stage that a rerun skips keeps its manifest and files, so its key and its MLflow run stay; a
stage that runs again with other results gets a new run.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

# MLflow accepts letters, digits, _ - . / space and : in metric and parameter names (ndcg@10 -> ndcg_10)
_BAD_NAME = re.compile(r"[^\w\-./ :]")
PARAM_VALUE_MAX = 6000  # MLflow 3's limit on a parameter value


@dataclass
class Record:
    """One nested run: its name, the stage, the key it is found by, and what it holds. `series`: metric ->
    [(step, value)] (per-epoch and per-step curves); `artifacts`: (file, folder in the run's artifacts)."""

    name: str
    stage: str
    key: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    started: float | None = None  # seconds since the epoch: when the stage started and finished (its manifest)
    finished: float | None = None


def name_of(key: str) -> str:
    return _BAD_NAME.sub("_", key)[:250]


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts and lists as {"a.b.0": leaf}; an empty dict or list is one leaf."""
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(obj, list) and obj:
        out = {}
        for i, v in enumerate(obj):
            out |= flatten(v, f"{prefix}{i}.")
        return out
    return {prefix[:-1]: obj}


def numbers(obj, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numeric leaves of `obj` (booleans and non-finite values left out; MLflow stores doubles), by flattened
    name, `prefix` added; top-level keys in `skip` left out."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in skip}
    return {name_of(prefix + k): float(v) for k, v in flatten(obj).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def params_of(obj, prefix: str = "") -> dict[str, str]:
    """Every leaf of `obj` as an MLflow parameter (a string; None as "null")."""
    out = {}
    for k, v in flatten(obj).items():
        text = "null" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        out[name_of(prefix + k)] = text[:PARAM_VALUE_MAX]
    return out


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _content_key(stage: str, files: list[Path]) -> str:
    h = hashlib.sha256(stage.encode())
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _times(manifest: dict) -> tuple[float | None, float | None]:
    try:
        end = time.mktime(time.strptime(manifest["finished_at"], "%Y-%m-%dT%H:%M:%S%z"))
    except (KeyError, ValueError):
        return None, None
    return end - float(manifest.get("seconds") or 0), end


def _from_manifest(stage: str, name: str, folder: Path) -> Record | None:
    """A stage's record with its manifest's fingerprints as parameters and its counts as metrics; None when the
    stage has not finished (no manifest)."""
    m = _read(folder / "manifest.json")
    if not m or m.get("stage") is None:
        return None
    rec = Record(name, stage, _hash(name, m.get("config_hash"), m.get("inputs"), m.get("finished_at")))
    rec.params = {"config_hash": str(m.get("config_hash"))} | params_of(m.get("inputs") or {}, "input.")
    rec.metrics = numbers(m, "manifest.", skip=("inputs", "config_hash", "finished_at", "stage", "variant", "train"))
    rec.started, rec.finished = _times(m)
    rec.artifacts.append((folder / "manifest.json", ""))
    return rec


def _teacher_training(run_dir: Path, stage: str) -> Record | None:
    """SFT or DPO: the trainer's log per optimizer step (loss, learning rate, DPO's rewards/margins, ...)."""
    folder = run_dir / "teacher" / stage
    rec = _from_manifest(stage, stage, folder)
    history = _read(folder / "log_history.json")
    if rec is None or history is None:
        return rec
    for entry in history:
        step = int(entry.get("step", 0))
        for k, v in numbers({k: v for k, v in entry.items() if k not in ("step", "epoch")}).items():
            rec.series.setdefault(k, []).append((step, v))
    rec.artifacts.append((folder / "log_history.json", ""))
    return rec


def _student(run_dir: Path, folder: Path) -> Record | None:
    """One student: per-epoch train losses (CE, guidance, KD), validation macro-F1 and the guidance diagnostics
    (history.json, step = epoch); its test and validation metrics (eval.json) and the selected epoch."""
    rel = folder.relative_to(run_dir / "student").as_posix().replace("variants/", "")
    rec = _from_manifest("student", f"student {rel}", folder)
    history, metrics, m = _read(folder / "history.json"), _read(folder / "eval.json"), _read(folder / "manifest.json")
    if rec is None or history is None or metrics is None:
        return None
    cfg = _read(folder / "best" / "student_config.json") or {}
    rec.params |= params_of({k: cfg[k] for k in ("extractor", "mode", "latent_dim", "poly_codes", "max_length") if k in cfg},
                            "student.") | {"student.folder": rel}
    for entry in history:
        for k, v in numbers({k: v for k, v in entry.items() if k != "epoch"}).items():
            rec.series.setdefault(k, []).append((int(entry["epoch"]), v))
    rec.params |= params_of(m.get("variant") or {}, "variant.") | params_of(m.get("train") or {}, "train.")
    # eval.json: the test split's metrics at its top level; validation (the reloaded best model), latent fidelity on
    # validation pairs, and facts about the student beside them (the diagnostics are the history's first and last)
    beside = ("fidelity", "extractor_params", "selected_epoch")
    test = {k: v for k, v in metrics.items() if k not in ("val", "diagnostics", *beside)}
    rec.metrics |= (numbers(test, "test.") | numbers(metrics.get("val") or {}, "val.")
                    | numbers({k: metrics[k] for k in beside if k in metrics}))
    rec.artifacts += [(folder / f, "") for f in ("history.json", "eval.json")]
    rec.artifacts += [(folder / "best" / f, "best") for f in ("selection.json", "student_config.json")]
    return rec


def _results(stage: str, path: Path, skip: tuple[str, ...], artifacts: list[tuple[Path, str]]) -> Record | None:
    """A stage whose result is one JSON file (no manifest of its own): its numbers, keyed by the files' content
    (`artifacts`: the other files it wrote, with their folder in the run's artifacts)."""
    data = _read(path)
    if data is None:
        return None
    files = [(path, ""), *artifacts]
    rec = Record(stage, stage, _content_key(stage, [f for f, _ in files]), metrics=numbers(data, skip=skip))
    rec.finished = path.stat().st_mtime
    rec.artifacts = [(f, where) for f, where in files if f.is_file()]
    return rec


def records(run_dir: Path) -> list[Record]:
    """Every finished stage and student of `run_dir`, in pipeline order."""
    run_dir = Path(run_dir)
    out = [_from_manifest("prepare", "prepare", run_dir / "data"), _from_manifest("generate", "generate", run_dir / "mpcot")]
    if out[1] is not None:
        stats = _read(run_dir / "mpcot" / "stats.json") or {}
        out[1].metrics |= numbers(stats)
        out[1].artifacts.append((run_dir / "mpcot" / "stats.json", ""))
    out += [_teacher_training(run_dir, "sft"), _teacher_training(run_dir, "dpo")]
    teacher = _from_manifest("teacher_eval", "teacher_eval", run_dir / "teacher" / "eval")
    if teacher is not None and (run_dir / "teacher" / "eval.json").is_file():  # base / SFT / DPO per prompt
        teacher.metrics |= numbers(_read(run_dir / "teacher" / "eval.json") or {})
        teacher.artifacts.append((run_dir / "teacher" / "eval.json", ""))
        out.append(teacher)
    student = run_dir / "student"
    folders = sorted(p.parent for p in student.glob("**/variants/*/manifest.json")) if student.is_dir() else []
    out += [_student(run_dir, f) for f in folders]
    # distill and ablate: aggregates over seeds, paired verdicts, diagnostics, probes (the runs are the students')
    out.append(_results("distill", student / "metrics.json", ("runs",), []))
    out.append(_results("distill_cv", student / "cv" / "metrics.json", ("runs",), []))
    out.append(_results("ablate", student / "ablation.json", ("runs",),
                        [(student / f"ablation.{x}", "") for x in ("csv", "md", "png")]))
    # report: metrics.json as written (what the report shows), report.md and the plots
    out.append(_results("report", run_dir / "metrics.json", ("benchmarks",),
                        [(run_dir / "report.md", ""), *[(p, "plots") for p in sorted((run_dir / "plots").glob("*.png"))]]))
    return [r for r in out if r is not None]
