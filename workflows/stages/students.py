"""`thinkbroad distill`: LRKD training of every student variant side by side, each scored once on the test split
(validation for selection and latent fidelity), and the paired verdicts -> RUN_DIR/student/metrics.json.

The examples each student streams are built from the splits and the targets (targets.py) with Ray Data
(examples.py) and handed to Ray Train as datasets; validation and test are scored by an actor pool
(student/score.py). The driver holds paths, counts and metrics. With distill.cv_folds > 1: cv.py."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from hardware.runtime import ensure_ray
from student.train import TRAINED, Variant
from workflows.artifacts import attempt_key, invalidate, is_fresh, start_attempt, write_json_atomic, write_manifest
from workflows.cards import summarise_cards, write_student_cards
from workflows.config import RunConfig
from workflows.models import resolve_model
from workflows.stages.common import log, remote
from workflows.stages.examples import StudentData
from workflows.stages.probe import probes
from workflows.stages.targets import teacher_tag
from workflows.stages.verdicts import metrics_table, variant_report, verdict_lines


def distill(cfg: RunConfig, run_dir: Path) -> Path:
    """Targets + every main variant side by side -> RUN_DIR/student/metrics.json (test metrics, the paired verdicts,
    validation metrics, diagnostics, the probes). With distill.cv_folds > 1: cross-validation instead
    (cv.py) -> RUN_DIR/student/cv/metrics.json."""
    if cfg.distill.cv_folds > 1:
        from workflows.stages.cv import distill_cv

        return distill_cv(cfg, run_dir)
    runs = train_variants(cfg, run_dir, cfg.distill.main_variants())
    report = variant_report(cfg, run_dir, runs) | {"probes": probes(run_dir)}
    path = run_dir / "student" / "metrics.json"
    write_json_atomic(report, path)
    summarise_cards(run_dir, report, path.name)  # each student's card: its variant over seeds, its verdicts
    log("student (test, mean +- std over seeds):\n" + metrics_table(report["variants"]))
    log("paired verdicts (test macro-F1 difference, 95% bootstrap interval):\n"
        + verdict_lines(report["verdicts"], report["vanilla_verdicts"]))
    return path


def train_variants(cfg: RunConfig, run_dir: Path, variants: list[Variant], teacher: str | None = None,
                   fold=None) -> list[dict]:
    """Train + evaluate each variant/seed (each cached in its own folder); returns [{variant, seed, metrics}].
    `teacher`: learn from another teacher's targets than `distill.teacher`; the variant names get a suffix.
    `fold` (a workflows.stages.cv.FoldView): train and score on that fold's splits, under its folder."""
    return train_variant_sets(cfg, run_dir, [(variants, teacher, fold)])[0]


@dataclasses.dataclass
class _Todo:
    """A student that is not up to date: its variant, folder, key and input fingerprints, and the data it reads."""

    variant: Variant
    out: Path
    key: str
    inputs: dict
    data: StudentData
    data_key: str  # unique across the sets: the teacher tag and the fold are part of it


def train_variant_sets(cfg: RunConfig, run_dir: Path, sets: list[tuple]) -> list[list[dict]]:
    """`train_variants` for several sets of (variants, teacher, fold) at once: the ablation's students of both
    teachers, every fold's students of a cross-validation. Returns each set's runs.

    The students not up to date, of every set, train one after another in ONE Ray Train worker group (a group
    costs ~20 s to start on 2 cores), each scored by the same workers once trained (no scoring actors to start):
    the test split once (with per-pair predictions), `val` (the reloaded best model on validation: what selection uses), `fidelity`
    (validation pairs with targets) and `diagnostics` (first and last epoch)."""
    settings = cfg.distill.train
    base_key = cfg.section_hash("labels", "perspectives", "data")
    planned, todo = [], []
    for n, (variants, teacher, fold) in enumerate(sets):
        tag = teacher_tag(cfg, teacher)
        data = StudentData(cfg, run_dir, teacher, fold)
        splits = {s: data.fingerprint(data.paths[s]) for s in ("train", "val", "test")}
        folder = {id(v): data.root / "variants" / f"{v.name}{tag}-seed{v.seed}" for v in variants}
        for v in variants:
            out, reads = folder[id(v)], data.reads(v)
            key = hashlib.sha256(json.dumps([base_key, dataclasses.asdict(v), settings.model_dump(), cfg.distill.backbone,
                                             cfg.distill.target_filter if reads else None, tag if reads else ""],
                                            sort_keys=True).encode()).hexdigest()[:16]
            inputs = splits | {f"targets_{s}": data.fingerprint(data.target_path(s)) for s in reads}
            if not is_fresh(out, key, inputs):
                invalidate(out)
                # another config or other inputs (splits, targets) discard the old student: trained.json, best/, history
                start_attempt(out, key, f"student {v.name}{tag}", inputs)
                todo.append(_Todo(v, out, key, inputs, data, f"set{n}|{data.job_key(v)}"))
        planned.append((variants, tag, data, folder, teacher, fold))
    if todo:
        _train_and_score(cfg, run_dir, todo)
    results = []
    for variants, tag, data, folder, teacher, fold in planned:
        write_student_cards(cfg, run_dir, [(v, v.name + tag, folder[id(v)]) for v in variants], data.paths, teacher, fold)
        results.append([{"variant": v.name + tag, "seed": v.seed, "metrics": json.loads((folder[id(v)] / "eval.json").read_text()),
                         "predictions": str(folder[id(v)] / "predictions" / "test")} for v in variants])
    return results


def _train_and_score(cfg: RunConfig, run_dir: Path, todo: list[_Todo]) -> None:
    """Train the students of `todo` in one worker group, which scores each on the validation and test splits once it
    is trained; write each one's eval.json and manifest. The group's Ray Train state lives under a folder named by what it trains, so rerunning the same
    students resumes the interrupted one."""
    from student.score import SCORED
    from student.train import StudentJob, train_students

    settings = cfg.distill.train
    ensure_ray()
    t0 = time.time()
    datasets = {t.data_key: t.data.for_variant(t.variant) for t in todo}
    group = hashlib.sha256(json.dumps(sorted((str(t.out), attempt_key(t.key, t.inputs)) for t in todo)).encode()).hexdigest()[:12]
    storage = run_dir / "student" / "trainer" / group
    log(f"students: {len(todo)} to train ({sum((t.out / TRAINED).exists() for t in todo)} already trained), one after "
        f"another in one Ray Train worker group ({settings.num_workers} workers), each scored on the validation and "
        "test splits by the same workers; progress per epoch below")
    first = todo[0].data
    jobs = [StudentJob(t.variant, str(t.out), t.data_key, attempt_key(t.key, t.inputs), score={
        "outputs": {_abs(t.data.paths["test"]): _abs(t.out / "predictions" / "test"),
                    _abs(t.data.examples(t.data.key(t.variant))["val"]): _abs(t.out / "predictions" / "val")},
        "trivial": _trivial(t.data, t.variant), "keep": t.variant.target_perspectives,
        "batch_size": cfg.distill.score.batch_size}) for t in todo]
    for j in jobs:  # a kill inside canonicalise (between its delete and its rename) leaves a folder missing: rescore
        if any(not Path(folder).is_dir() for folder in j.score["outputs"].values()):
            (Path(j.out_dir) / SCORED).unlink(missing_ok=True)
    train_students(jobs, datasets, settings, resolve_model(cfg.distill.backbone), first.codes, first.persp, storage)
    from pairs.parquet import canonicalise  # the parts named and ordered by pair_id, not by actor timing

    remote(canonicalise)([folder for j in jobs for folder in j.score["outputs"].values()], ["pair_id"])
    for t in todo:
        history = json.loads((t.out / "history.json").read_text())
        write_json_atomic(_score(t.out, t.data, t.variant, history), t.out / "eval.json")
        write_manifest(t.out, "student", t.key, t.inputs, t0, epochs=len(history),
                       best_val_macro_f1=max(h["val_macro_f1"] for h in history),
                       variant=dataclasses.asdict(t.variant), train=settings.model_dump())  # both: MLflow parameters
    shutil.rmtree(storage, ignore_errors=True)


def _abs(path) -> str:
    return str(Path(path).resolve())  # the workers' working directory is not the driver's


def _trivial(data: StudentData, v: Variant) -> list | None:
    """The trivial fidelity predictor of an LRKD student with targets (per projection head), else None."""
    if v.kind != "lrkd" or v.lam == 0:
        return None
    if v.mode == "average":
        return [data.examples(data.key(v))["summary"]["trivial_average"]]
    return data.centroids(v.target_source or data.cfg.distill.target_source)["centroids"]


def _score(out: Path, data: StudentData, v: Variant, history: list[dict]) -> dict:
    """From the scored parts (the training workers wrote them): test metrics (once, in the split's pair order), validation metrics of the
    reloaded best model, latent fidelity on the validation pairs with targets, diagnostics."""
    from student.model import LRKDStudent
    from student.score import gains_of, metrics_from_parts

    best = out / "best"
    model = LRKDStudent.from_pretrained(best)
    labels, gains = data.codes, gains_of(data.cfg.labels)
    # in Ray tasks: the driver never holds the scored rows
    metrics = remote(metrics_from_parts)(out / "predictions" / "test", labels, data.persp, gains,
                                         order=str(data.paths["test"]), mode=v.mode)
    metrics.pop("predictions")  # per pair: they stay in the parts (verdicts read them there, joined on pair_id)
    val = remote(metrics_from_parts)(out / "predictions" / "val", labels, data.persp, gains, mode=v.mode)
    metrics["val"] = {k: val[k] for k in ("n", "accuracy", "macro_f1", "per_class_f1", "ranking") if k in val}
    metrics["extractor_params"] = model.extractor_parameters()
    metrics["selected_epoch"] = json.loads((best / "selection.json").read_text())["epoch"]
    if val.get("fidelity"):
        metrics["fidelity"] = val["fidelity"]
    diag = [{k[5:]: h[k] for k in h if k.startswith("diag_")} | {"epoch": h["epoch"]} for h in history]
    if any(len(d) > 1 for d in diag):
        metrics["diagnostics"] = {"first_epoch": diag[0], "last_epoch": diag[-1]}
    return metrics
