"""StudentData: the examples every student variant streams (built with Ray Data from the splits and the targets,
student/examples.py), and the small facts about them training needs (centroids, label counts, rows, the probe
batch); for a run, or for one cross-validation fold (cv.py)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from hardware.runtime import ensure_ray
from student.train import Variant
from workflows.artifacts import fingerprint, invalidate, is_fresh, write_json_atomic, write_manifest
from workflows.config import RunConfig
from workflows.stages.common import log, remote
from workflows.stages.prepare import prepare
from workflows.stages.targets import targets, teacher_tag


class StudentData:
    """The examples every variant streams, built once per (kind, target source) under RUN_DIR/student/examples/ with
    Ray Data, and the small facts about them training needs (centroids, label counts, rows, the probe batch).

    kinds: plain (pairs only: vanilla and lambda = 0 students), targets:<source> (pairs + that source's rationale
    embeddings: LRKD with lambda > 0; validation keeps the sampled fidelity targets), votes (pairs + the
    teacher's answers: logit-KD).

    `fold` (cross-validation): the fold's split files instead of the run's, its view of the targets (the run's
    target rows of its train and val pairs), and its own folder for examples and students."""

    def __init__(self, cfg: RunConfig, run_dir: Path, teacher: str | None = None, fold=None):
        self.cfg, self.run_dir, self.teacher, self.fold = cfg, run_dir, teacher, fold
        self.paths = fold.paths if fold else prepare(cfg, run_dir)
        self.root = fold.root if fold else run_dir / "student"
        self.codes = [lab.name for lab in cfg.labels]
        self.persp = [p.name for p in cfg.perspectives]
        self._paths: dict[str, Path] = {}
        self._built: dict[str, dict] = {}
        self._fingerprints: dict[Path, str] = {}

    def fingerprint(self, path: Path) -> str:
        """A file's or folder's content hash, computed once per stage (targets are gigabytes at scale)."""
        if path not in self._fingerprints:
            self._fingerprints[path] = fingerprint(path)
        return self._fingerprints[path]

    def target_path(self, source: str) -> Path:
        if source not in self._paths:
            path = targets(self.cfg, self.run_dir, source, self.teacher)
            if self.fold is not None:
                from workflows.stages.cv import fold_targets

                path = fold_targets(path, self.fold, self.fingerprint(path))
            self._paths[source] = path
        return self._paths[source]

    def key(self, v: Variant) -> str:
        """Which examples `v` trains on."""
        if v.kind == "logit_kd":
            return "votes"
        if v.kind == "lrkd" and v.lam > 0:
            return f"targets:{v.target_source or self.cfg.distill.target_source}"
        return "plain"

    def reads(self, v: Variant) -> list[str]:
        """The target sources a variant's student depends on: its guidance targets (LRKD, lambda > 0), the centroids
        its model carries for attribution (every LRKD student, the lambda = 0 control too), the votes (logit-KD)."""
        if v.kind == "logit_kd":
            return ["teacher"]
        if v.kind == "lrkd":
            return [v.target_source or self.cfg.distill.target_source]
        return []

    def job_key(self, v: Variant) -> str:
        """Which training data (StudentData) a job reads: its examples, the centroids an LRKD student carries (the
        lambda = 0 control has its twin's target width and centroids; vanilla has none) and a perspective subset.
        Two variants share a key only when they train on the same data."""
        cents = f"centroids:{self.reads(v)[0]}" if v.kind == "lrkd" else "no-centroids"
        return "|".join([self.key(v), cents, *(v.target_perspectives or [])])

    def centroids(self, source: str) -> dict:
        """Per-perspective mean of the kept train targets (and their counts), from the sparse target rows."""
        from student.examples import target_centroids

        path = self.target_path(source)
        out = path.parent / "centroids.json"
        fp = self.fingerprint(path) + self.cfg.distill.target_filter
        if out.exists() and json.loads(out.read_text()).get("targets") == fp:
            return json.loads(out.read_text())
        result = remote(target_centroids)(str(path), self.persp, self.cfg.distill.target_filter) | {"targets": fp}
        write_json_atomic(result, out)
        return result

    def examples(self, kind: str) -> dict:
        """{"train", "val": Parquet folders, "summary": examples_summary of train (+ "val_summary")}, built once
        (a manifest keyed on the splits, the targets and the filter)."""
        from student.examples import SUMMARY, examples_summary, write_examples

        if kind in self._built:
            return self._built[kind]
        source = kind.split(":", 1)[1] if kind.startswith("targets:") else "teacher" if kind == "votes" else None
        tpath = self.target_path(source) if source else None
        tag = teacher_tag(self.cfg, self.teacher) if source and source != "label_text" else ""
        out = self.root / "examples" / (kind.replace(":", "-") + tag)
        inputs = {s: self.fingerprint(self.paths[s]) for s in ("train", "val")} | ({"targets": self.fingerprint(tpath)} if tpath else {})
        key = hashlib.sha256(json.dumps([kind, self.cfg.distill.target_filter, self.codes, self.persp,
                                         self.cfg.distill.train.batch_size]).encode()).hexdigest()[:16]
        if not is_fresh(out, key, inputs):
            invalidate(out)
            t0 = time.time()
            ensure_ray()
            rows = write_examples({s: self.paths[s] for s in ("train", "val")}, out, self.codes, self.persp, tpath,
                                  self.cfg.distill.target_filter, targets=kind.startswith("targets:"), votes=kind == "votes")
            for split in ("train", "val"):
                remote(examples_summary)(str(out / split), self.codes, self.persp, self.cfg.distill.train.batch_size)
            write_manifest(out, "examples", key, inputs, t0, rows=rows, kind=kind)
            log(f"examples [{kind}{tag}]: train {rows['train']}, val {rows['val']} pairs -> {out}")
        self._built[kind] = {"train": out / "train", "val": out / "val", "dir": out,
                             "summary": json.loads((out / f"train.{SUMMARY}").read_text())}
        return self._built[kind]

    def for_variant(self, v: Variant):
        """The TrainData (student/train.py) `v` trains on: its examples, with the configured source's centroids
        for any LRKD student (attribution at inference)."""
        from student.examples import PROBE
        from student.train import TrainData

        ex = self.examples(self.key(v))
        k = len(self.persp)
        if v.kind == "lrkd":
            cents = self.centroids(v.target_source or self.cfg.distill.target_source)["centroids"]
        else:
            cents = [[0.0]] * k
        return TrainData(train=str(ex["train"]), val=str(ex["val"]), centroids=cents,
                         label_counts=ex["summary"]["label_counts"], rows=ex["summary"]["rows"],
                         target_dim=len(cents[0]), probe=str(ex["dir"] / f"train.{PROBE}"))
