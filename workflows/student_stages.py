"""Student stages: distillation targets (teacher rationales -> frozen embeddings, with an informativeness probe),
LRKD training of every variant side by side, evaluation (test once, validation for selection and latent
fidelity), paired verdicts against lambda = 0, and the ablation sweep.

At scale: targets are a Parquet folder of one row per (pair, perspective) that has one; the examples each student
streams are built from the splits and the targets with Ray Data (student/examples.py) and handed to Ray Train as
datasets; validation and test are scored by an actor pool (student/score.py). The driver holds paths, counts
and metrics."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mpcot.generate import run_generation
from mpcot.tasks import PairSource, TaskPlan
from pairs.parquet import batches, write_parquet_atomic
from student.config import DistillConfig
from student.evaluate import aggregate, paired_bootstrap
from student.examples import keep_mask
from student.train import TRAINED, Variant
from workflows.artifacts import (attempt_key, fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic,
                                 write_manifest, write_text_atomic)
from workflows.config import RunConfig
from workflows.models import resolve_model
from hardware.runtime import ensure_ray
from workflows.stages import judge_spec, log, prepare

TARGET_COLUMNS = ["pair_id", "perspective", "split", "rationale", "predicted_label", "gold_label", "parse_ok", "correct"]


def _teacher_model(cfg: RunConfig, run_dir: Path, choice: str) -> tuple[str, str]:
    if choice in ("dpo", "sft"):
        from workflows import teacher_stages

        path = teacher_stages.dpo(cfg, run_dir) if choice == "dpo" else teacher_stages.sft(cfg, run_dir)
        return str(path), choice
    if choice == "base":
        return resolve_model(cfg.teacher.model), "base"
    return resolve_model(choice), choice


def targets_key(cfg: RunConfig, teacher: str, source: str) -> str:
    """What the targets depend on: which pairs (sample sizes, seed), the source, and for LLM sources the teacher's
    prompts and sampling; not the filter, the student's settings or the variants, which reuse the same targets."""
    d = cfg.distill
    parts = [source, d.max_target_pairs, d.fidelity_pairs, cfg.seed, d.embedder, d.embed_pooling,
             cfg.section_hash("labels", "perspectives")]
    if d.cv_folds > 1:  # the sample is drawn from every split (every pair trains in some fold)
        parts.append(["cv", d.cv_folds])
    if source != "label_text":
        parts += [cfg.section_hash("teacher", "generation"), teacher]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _teacher_tag(cfg: RunConfig, teacher: str | None) -> str:
    """'' for the configured teacher; '-<teacher>teacher' for another one (ablation), in folder and variant names."""
    return "" if teacher in (None, cfg.distill.teacher) else f"-{teacher}teacher"


def stratified_sample(table: pa.Table, n: int | None, seed: int) -> pa.Table:
    """A seeded sample of n rows with each label's share kept (largest remainders), in the table's order."""
    if n is None or n >= table.num_rows:
        return table
    labels = np.asarray(table.column("label").to_pylist())
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / counts.sum()
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota))[: n - quota.sum()]] += 1
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    return table.take(pa.array(np.sort(keep), pa.int64()))


def _sample_ids(path: Path, n: int | None, seed: int) -> pa.Array | None:
    """The pair ids of a stratified sample of n pairs of a split (only pair_id and label are read); None = all."""
    if n is None or n >= pq.ParquetFile(path).metadata.num_rows:
        return None
    return stratified_sample(pq.read_table(path, columns=["pair_id", "label"]), n, seed).column("pair_id")


def target_pairs(cfg: RunConfig, paths: dict[str, Path]) -> dict[str, pa.Array | None]:
    """The ids of the train pairs that get targets (for the guidance term) and of the val pairs that get them (for
    latent fidelity only), each a stratified sample; None where every pair of the split does.

    Cross-validation (distill.cv_folds = k > 1): every split's pairs train in some fold, so each split gets a
    stratified sample of its share of (max_target_pairs + fidelity_pairs) x k / (k - 1) pairs: a fold's train and val
    pairs then hold about as many targets as the plain split's do."""
    d = cfg.distill
    if d.cv_folds > 1:
        rows = {s: pq.ParquetFile(paths[s]).metadata.num_rows for s in ("train", "val", "test")}
        wanted = None if d.max_target_pairs is None or d.fidelity_pairs is None else \
            (d.max_target_pairs + d.fidelity_pairs) * d.cv_folds / (d.cv_folds - 1)
        return {s: _sample_ids(paths[s], None if wanted is None else max(1, round(wanted * n / sum(rows.values()))),
                               cfg.seed + i) for i, (s, n) in enumerate(rows.items())}
    return {"train": _sample_ids(paths["train"], d.max_target_pairs, cfg.seed),
            "val": _sample_ids(paths["val"], d.fidelity_pairs, cfg.seed + 1)}


def _sampled_pairs(path: Path, ids: pa.Array | None, out: Path) -> Path:
    """The split file itself when every pair is wanted, else its sampled pairs written to `out` (read in batches)."""
    if ids is None:
        return path
    write_parquet_atomic(pa.concat_tables([b.filter(pc.is_in(b.column("pair_id"), value_set=ids)) for b in batches(path)]), out)
    return out


def targets(cfg: RunConfig, run_dir: Path, source: str | None = None, teacher: str | None = None) -> Path:
    """RUN_DIR/student/targets/<source>[-<teacher>teacher]/targets.parquet/ (a Parquet folder): one row per
    (pair, perspective) of the sampled train and val pairs: the rationale, its labels and flags, and its
    L2-normalised embedding (`embedding`, fixed_size_list<float32>[D]).

    teacher / gold_conditioned: the teacher (`distill.teacher`, or `teacher` for the ablation) writes one greedy
    rationale per perspective, told the gold label when gold_conditioned; label_text: every perspective's target is
    the embedding of the gold label's description (the label texts are embedded once). The manifest holds the
    informativeness probe.
    """
    d: DistillConfig = cfg.distill
    source, teacher = source or d.target_source, teacher or d.teacher
    llm = source != "label_text"
    # cross-validation samples every split: its targets sit beside the plain run's, not in their place
    cv = f"-cv{d.cv_folds}" if d.cv_folds > 1 else ""
    out = run_dir / "student" / "targets" / (source + (_teacher_tag(cfg, teacher) if llm else "") + cv)
    path = out / "targets.parquet"
    split_paths = prepare(cfg, run_dir)
    teacher_path, teacher_name = _teacher_model(cfg, run_dir, teacher) if llm else ("", "")
    key = targets_key(cfg, teacher if llm else "", source)
    inputs = {s: fingerprint(split_paths[s]) for s in (("train", "val", "test") if d.cv_folds > 1 else ("train", "val"))}
    if llm:
        inputs["teacher"] = fingerprint(teacher_path)
    if is_fresh(out, key, inputs):
        log(f"targets [{source}]: up to date ({out})")
        return path
    invalidate(out)
    t0 = time.time()
    ensure_ray()
    ids = target_pairs(cfg, split_paths)
    if llm:
        rows = _embed(cfg, _teacher_rationales(cfg, split_paths, ids, out, attempt_key(key, inputs), source, teacher_path,
                                               teacher_name))
    else:
        rows = _label_text_rows(cfg, split_paths, ids)
    n = _write_parquet_folder(rows, path)
    probe = _remote(informativeness)(str(path), [p.name for p in cfg.perspectives], d.target_filter)
    write_json_atomic(probe, out / "probe.json")
    counts = {s: len(ids[s]) if ids[s] is not None else pq.ParquetFile(split_paths[s]).metadata.num_rows for s in ids}
    write_manifest(out, "targets", key, inputs, t0, rows=n, source=source, teacher=teacher_name or None,
                   embedder=d.embedder, pairs=counts, probe=probe)
    shutil.rmtree(out / "parts", ignore_errors=True)
    shutil.rmtree(out / "rationales.parquet", ignore_errors=True)
    for split in ids:
        (out / f"pairs-{split}.parquet").unlink(missing_ok=True)
    log(f"targets [{source}]: {n} rationale embeddings ({d.embedder}) -> {path}")
    log(f"targets [{source}]: probe (5-fold logistic regression, embeddings -> gold label, macro-F1 vs majority): "
        + ", ".join(f"{k} {v['macro_f1']:.2f} vs {v['majority_macro_f1']:.2f}" if "macro_f1" in v else f"{k}: {v['note']}"
                    for k, v in probe.items()))
    return path


def _remote(fn):
    """Run `fn` as a Ray task (heavy passes over targets stay off the driver); returns a caller that waits."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return lambda *args, **kwargs: ray.get(task.remote(*args, **kwargs))


def _teacher_rationales(cfg: RunConfig, split_paths: dict[str, Path], ids: dict, out: Path, key: str, source: str,
                        teacher_path: str, teacher_name: str):
    """The teacher's rationales for the sampled pairs (a Ray Dataset with TARGET_COLUMNS)."""
    import ray

    sources = {s: _sampled_pairs(split_paths[s], ids[s], out / f"pairs-{s}.parquet") for s in ids}
    tasks = TaskPlan(tuple(PairSource(s, str(p)) for s, p in sources.items()), tuple(p.name for p in cfg.perspectives), 1)
    pairs = dict(zip(sources, tasks.pair_counts()))
    gen = cfg.generation.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    spec = dataclasses.replace(judge_spec(cfg, teacher_path, teacher_name, cfg.perspectives, gen),
                               gold_hint=source == "gold_conditioned")
    log(f"targets [{source}]: {teacher_name} teacher writes {tasks.num_tasks()} rationales ("
        + " + ".join(f"{n} {s}" for s, n in pairs.items()) + f" pairs x {len(cfg.perspectives)} perspectives"
        + ("; told the gold label" if spec.gold_hint else "") + ")")
    start_attempt(out / "parts", key, "targets")
    res = run_generation(tasks, out, spec, gen)
    return ray.data.read_parquet(str(Path(res.rationales_path).resolve())).select_columns(TARGET_COLUMNS)


def _label_text_batch(batch: pa.Table, split: str, perspectives: list[str], text: dict[str, str],
                      vectors: dict[str, list]) -> pa.Table:
    """A batch of pairs (pair_id, label) -> their (pair, perspective) rows with the gold label's text as rationale and
    that text's embedding."""
    k = len(perspectives)
    n = batch.num_rows
    labels = np.repeat(np.asarray(batch.column("label").to_pylist(), dtype=object), k)
    dim = len(next(iter(vectors.values())))
    emb = np.asarray([vectors[lab] for lab in labels], np.float32).reshape(-1) if n else np.zeros(0, np.float32)
    return pa.table({
        "pair_id": pa.array(np.repeat(np.asarray(batch.column("pair_id").to_pylist(), dtype=object), k), pa.string()),
        "perspective": pa.array(perspectives * n, pa.string()), "split": pa.array([split] * (n * k), pa.string()),
        "rationale": pa.array([text[lab] for lab in labels], pa.string()),
        "predicted_label": pa.array(labels, pa.string()), "gold_label": pa.array(labels, pa.string()),
        "parse_ok": pa.array(np.ones(n * k, bool)), "correct": pa.array(np.ones(n * k, bool)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb), dim),
    })


def _embed_texts(encoder_path: str, pooling: str, texts: list[str]) -> list:
    from student.embed import RationaleEmbedder

    return RationaleEmbedder(encoder_path, pooling=pooling).embed(texts).tolist()


def _label_text_rows(cfg: RunConfig, split_paths: dict[str, Path], ids: dict):
    """The control target: '<title>: <description>' of the pair's gold label, the same for every perspective, for
    the sampled pairs (a Ray Dataset of target rows with their embeddings; no LLM). The label texts are embedded
    once, in a Ray task."""
    import ray

    text = {lab.name: f"{lab.title}: {lab.description}" if lab.description else lab.title for lab in cfg.labels}
    d = cfg.distill
    vecs = _remote(_embed_texts)(resolve_model(d.embedder), d.embed_pooling, list(text.values()))
    vectors = dict(zip(text, vecs))
    persp = [p.name for p in cfg.perspectives]
    parts = []
    for split in ids:
        ds = ray.data.read_parquet(str(split_paths[split].resolve())).select_columns(["pair_id", "label"])
        if ids[split] is not None:
            ref = ray.put(ids[split])
            ds = ds.map_batches(_in_sample, fn_kwargs={"ids_ref": ref}, batch_format="pyarrow")
        parts.append(ds.map_batches(_label_text_batch, fn_kwargs={"split": split, "perspectives": persp, "text": text,
                                                                  "vectors": vectors}, batch_format="pyarrow"))
    log(f"targets [label_text]: gold label descriptions as every (pair, perspective)'s rationale, {len(text)} texts "
        "embedded once, no LLM")
    return parts[0].union(*parts[1:])


def _in_sample(batch: pa.Table, ids_ref) -> pa.Table:
    import ray

    return batch.filter(pc.is_in(batch.column("pair_id"), value_set=ray.get(ids_ref)))


def _embed(cfg: RunConfig, rows):
    """The rows with the frozen embedder's vector of each rationale (a Ray Data actor pool; each distinct text of a
    batch is embedded once)."""
    import ray

    from student.embed import RationaleEmbedder, embedder_placement

    d = cfg.distill
    actors, resources = embedder_placement(ray.cluster_resources().get("GPU", 0))
    return rows.map_batches(
        RationaleEmbedder, fn_constructor_kwargs={"encoder_path": resolve_model(d.embedder), "pooling": d.embed_pooling},
        batch_size=d.embed_batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), **resources)


def _write_parquet_folder(ds, path: Path) -> int:
    """Writes a Ray Dataset to the Parquet folder `path`, named and ordered by content (a Ray task rewrites Ray
    Data's output, whose file names are random and whose row order follows task completion, into hash buckets of
    pair_id sorted by (pair_id, perspective)): the same targets give the same files, so the folder's fingerprint,
    the centroids' sums and the probe's sample do not change with scheduling. Returns its rows."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp.resolve()))
    final = path.with_name(f".{path.name}.canonical")
    from pairs.parquet import canonical_parquet

    n = _remote(canonical_parquet)(str(tmp), str(final), ["pair_id", "perspective"])
    shutil.rmtree(path, ignore_errors=True)
    final.rename(path)
    shutil.rmtree(tmp, ignore_errors=True)
    return n


PROBE_ROWS = 20_000  # per perspective: a seeded uniform sample beyond this (the fit is what costs, not the rows)


def informativeness(table, perspectives: list[str], target_filter: str, folds: int = 5, max_rows: int = PROBE_ROWS) -> dict:
    """Per perspective, on the train rows the filter keeps: macro-F1 of a 5-fold cross-validated logistic
    regression from the rationale embedding to the gold label, against always answering the majority label.
    A probe no better than the majority says the targets cannot teach the label, whatever else they carry.

    table: the targets (a pa.Table or a Parquet file/folder, read in batches); beyond `max_rows` kept rows per
    perspective a seeded uniform sample of that many is probed (`probed` says how many)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(0)
    kept: dict[str, list] = {name: [] for name in perspectives}
    seen = dict.fromkeys(perspectives, 0)
    source = [table] if isinstance(table, pa.Table) else batches(table, ["perspective", "split", "gold_label", "embedding", "parse_ok", "correct"])
    for b in source:
        b = b.filter(pc.equal(b.column("split"), "train"))
        b = b.filter(pa.array(keep_mask(b, target_filter)))
        for name in perspectives:
            mine = b.filter(pc.equal(b.column("perspective"), name))
            if not mine.num_rows:
                continue
            # reservoir by random keys: keep the max_rows smallest keys seen so far
            keys = rng.random(mine.num_rows)
            kept[name].append(mine.select(["gold_label", "embedding"]).append_column("key", pa.array(keys)))
            seen[name] += mine.num_rows
            merged = pa.concat_tables(kept[name])
            if merged.num_rows > 2 * max_rows:
                kept[name] = [merged.take(pc.sort_indices(merged, [("key", "ascending")])[:max_rows])]
    out = {}
    for name in perspectives:
        merged = pa.concat_tables(kept[name]) if kept[name] else None
        if merged is not None and merged.num_rows > max_rows:
            merged = merged.take(pc.sort_indices(merged, [("key", "ascending")])[:max_rows])
        y = np.asarray(merged.column("gold_label").to_pylist()) if merged is not None else np.array([])
        classes, counts = np.unique(y, return_counts=True) if len(y) else (np.array([]), np.array([]))
        result = {"rows": seen[name], "label_counts": dict(zip(classes.tolist(), counts.tolist()))}
        if seen[name] > len(y):
            result["probed"] = int(len(y))
        usable = classes[counts >= 2]
        if len(usable) < 2:
            out[name] = result | {"note": "fewer than two labels with two rows each: nothing to probe"}
            continue
        keep = np.isin(y, usable)
        emb = merged.column("embedding").combine_chunks()
        x = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1).astype(np.float32)[keep]
        y = y[keep]
        k = int(min(folds, np.unique(y, return_counts=True)[1].min()))
        pred = cross_val_predict(LogisticRegression(max_iter=2000, class_weight="balanced"), x, y,
                                 cv=StratifiedKFold(k, shuffle=True, random_state=0))
        majority = np.full_like(y, classes[np.argmax(counts)])
        out[name] = result | {"folds": k, "macro_f1": float(f1_score(y, pred, average="macro")),
                              "majority_macro_f1": float(f1_score(y, majority, average="macro", zero_division=0))}
    return out


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
                from workflows.student_cv import fold_targets

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
        result = _remote(target_centroids)(str(path), self.persp, self.cfg.distill.target_filter) | {"targets": fp}
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
        tag = _teacher_tag(self.cfg, self.teacher) if source and source != "label_text" else ""
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
                _remote(examples_summary)(str(out / split), self.codes, self.persp, self.cfg.distill.train.batch_size)
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


def train_variants(cfg: RunConfig, run_dir: Path, variants: list[Variant], teacher: str | None = None,
                   fold=None) -> list[dict]:
    """Train + evaluate each variant/seed (each cached in its own folder); returns [{variant, seed, metrics}].

    The ones not up to date train one after another in one Ray Train worker group, then each is scored on Ray Data
    workers: the test split once (with per-pair predictions), `val` (the reloaded best model on validation: what
    selection uses), `fidelity` (validation pairs with targets) and `diagnostics` (first and last epoch).
    `teacher`: learn from another teacher's targets than `distill.teacher`; the variant names get a suffix.
    `fold` (a workflows.folds.FoldView): train and score on that fold's splits, under its folder."""
    from student.score import ScoreJob, score_many
    from student.train import StudentJob, train_students

    tag = _teacher_tag(cfg, teacher)
    data = StudentData(cfg, run_dir, teacher, fold)
    settings = cfg.distill.train
    base_key = cfg.section_hash("labels", "perspectives", "data")
    splits = {s: data.fingerprint(data.paths[s]) for s in ("train", "val", "test")}
    folder = {id(v): data.root / "variants" / f"{v.name}{tag}-seed{v.seed}" for v in variants}
    data_key = {id(v): data.job_key(v) for v in variants}
    todo = []
    for v in variants:
        out = folder[id(v)]
        reads = data.reads(v)
        key = hashlib.sha256(json.dumps([base_key, dataclasses.asdict(v), settings.model_dump(), cfg.distill.backbone,
                                         cfg.distill.target_filter if reads else None, tag if reads else ""],
                                        sort_keys=True).encode()).hexdigest()[:16]
        inputs = splits | {f"targets_{s}": data.fingerprint(data.target_path(s)) for s in reads}
        if not is_fresh(out, key, inputs):
            invalidate(out)
            # another config or other inputs (splits, targets) discard the old student: trained.json, best/, history
            start_attempt(out, key, f"student {v.name}{tag}", inputs)
            todo.append((v, out, key, inputs))
    if todo:
        ensure_ray()
        t0 = time.time()
        datasets = {data_key[id(v)]: data.for_variant(v) for v, *_ in todo}
        group = hashlib.sha256(json.dumps(sorted((str(o), attempt_key(k, i)) for _, o, k, i in todo)).encode()).hexdigest()[:12]
        storage = data.root / "trainer" / group
        log(f"students: {len(todo)} to train ({sum((o / TRAINED).exists() for _, o, *_ in todo)} already trained), one after "
            f"another in one Ray Train worker group ({settings.num_workers} workers); progress per epoch below")
        train_students([StudentJob(v, str(o), data_key[id(v)], attempt_key(k, i)) for v, o, k, i in todo], datasets, settings,
                       resolve_model(cfg.distill.backbone), data.codes, data.persp, storage)
        log(f"students: scoring {len(todo)} on the validation and test splits (Ray Data actors)")
        jobs, sources = [], {"test": data.paths["test"]}
        for v, out, *_ in todo:
            kind = data.key(v)
            sources[f"val:{kind}"] = data.examples(kind)["val"]
            jobs.append(ScoreJob(str(out / "best"), {"test": str(out / "predictions" / "test"),
                                                     f"val:{kind}": str(out / "predictions" / "val")},
                                 _trivial(data, v), v.target_perspectives))
        score_many(jobs, sources, cfg.distill.score)
        from pairs.parquet import canonicalise  # the parts named and ordered by pair_id, not by actor timing

        _remote(canonicalise)([folder for j in jobs for folder in j.outputs.values()], ["pair_id"])
        for v, out, key, inputs in todo:
            history = json.loads((out / "history.json").read_text())
            write_json_atomic(_score(out, data, v, history), out / "eval.json")
            write_manifest(out, "student", key, inputs, t0, epochs=len(history),
                           best_val_macro_f1=max(h["val_macro_f1"] for h in history),
                           variant=dataclasses.asdict(v), train=settings.model_dump())  # both: MLflow parameters
        shutil.rmtree(storage, ignore_errors=True)
    return [{"variant": v.name + tag, "seed": v.seed, "metrics": json.loads((folder[id(v)] / "eval.json").read_text()),
             "predictions": str(folder[id(v)] / "predictions" / "test")} for v in variants]


def score_split(cfg: RunConfig, student: Path, source, out_dir: Path, trivial: list | None = None,
                keep: list[str] | None = None, what: str = "score", order: str | Path | None = None) -> dict:
    """Score a Parquet split or examples folder with `student` on Ray Data workers into out_dir/part-*.parquet
    (resuming finished parts) and return its metrics (with fidelity when the rows carry targets and `trivial`;
    `keep`: the perspectives whose targets count; `order`: a split file whose pair ids the metrics must cover, in
    its order). The metrics are computed in a Ray task: the driver never holds the scored rows."""
    from student.score import gains_of, metrics_from_parts, score_dataset

    ensure_ray()
    score_dataset(source, student, out_dir, cfg.distill.score, trivial=trivial, progress=False, what=what, keep=keep)
    persp = [p.name for p in cfg.perspectives]
    mode = json.loads((student / "student_config.json").read_text())["mode"]
    return _remote(metrics_from_parts)(out_dir, [lab.name for lab in cfg.labels], persp, gains_of(cfg.labels), mode=mode,
                                       order=None if order is None else str(order))


def _trivial(data: StudentData, v: Variant) -> list | None:
    """The trivial fidelity predictor of an LRKD student with targets (per projection head), else None."""
    if v.kind != "lrkd" or v.lam == 0:
        return None
    if v.mode == "average":
        return [data.examples(data.key(v))["summary"]["trivial_average"]]
    return data.centroids(v.target_source or data.cfg.distill.target_source)["centroids"]


def _score(out: Path, data: StudentData, v: Variant, history: list[dict]) -> dict:
    """From the scored parts (score_many): test metrics (once, in the split's pair order), validation metrics of the
    reloaded best model, latent fidelity on the validation pairs with targets, diagnostics."""
    from student.model import LRKDStudent
    from student.score import gains_of, metrics_from_parts

    best = out / "best"
    model = LRKDStudent.from_pretrained(best)
    labels, gains = data.codes, gains_of(data.cfg.labels)
    # in Ray tasks: the driver never holds the scored rows
    metrics = _remote(metrics_from_parts)(out / "predictions" / "test", labels, data.persp, gains,
                                          order=str(data.paths["test"]), mode=v.mode)
    metrics.pop("predictions")  # per pair: they stay in the parts (verdicts read them there, joined on pair_id)
    val = _remote(metrics_from_parts)(out / "predictions" / "val", labels, data.persp, gains, mode=v.mode)
    metrics["val"] = {k: val[k] for k in ("n", "accuracy", "macro_f1", "per_class_f1", "ranking") if k in val}
    metrics["extractor_params"] = model.extractor_parameters()
    metrics["selected_epoch"] = json.loads((best / "selection.json").read_text())["epoch"]
    if val.get("fidelity"):
        metrics["fidelity"] = val["fidelity"]
    diag = [{k[5:]: h[k] for k in h if k.startswith("diag_")} | {"epoch": h["epoch"]} for h in history]
    if any(len(d) > 1 for d in diag):
        metrics["diagnostics"] = {"first_epoch": diag[0], "last_epoch": diag[-1]}
    return metrics


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


def _report(cfg: RunConfig, run_dir: Path, runs: list[dict]) -> dict:
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


def probes(run_dir: Path) -> dict:
    """The informativeness probe of every target source written so far."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "student" / "targets").glob("*/probe.json"))}


def distill(cfg: RunConfig, run_dir: Path) -> Path:
    """Targets + every main variant side by side -> RUN_DIR/student/metrics.json (test metrics, the paired verdicts,
    validation metrics, diagnostics, the probes). With distill.cv_folds > 1: cross-validation instead
    (workflows/student_cv.py) -> RUN_DIR/student/cv/metrics.json."""
    if cfg.distill.cv_folds > 1:
        from workflows.student_cv import distill_cv

        return distill_cv(cfg, run_dir)
    runs = train_variants(cfg, run_dir, cfg.distill.main_variants())
    report = _report(cfg, run_dir, runs) | {"probes": probes(run_dir)}
    path = run_dir / "student" / "metrics.json"
    write_json_atomic(report, path)
    log("student (test, mean +- std over seeds):\n" + metrics_table(report["variants"]))
    log("paired verdicts (test macro-F1 difference, 95% bootstrap interval):\n"
        + verdict_lines(report["verdicts"], report["vanilla_verdicts"]))
    return path


def verdict_lines(*groups: dict) -> str:
    return "\n".join(f"- {name} vs {r['against']}: {r['mean_diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] over "
                     f"{len(r['seeds'])} seeds x {r['test_pairs']} test pairs: {r['verdict']}"
                     for v in groups for name, r in v.items())


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
    runs = train_variants(cfg, run_dir, d.ablation_variants(persp))
    variants = {v.name: v for v in d.ablation_variants(persp)}
    other = _other_teacher(cfg, run_dir) if d.ablate_teacher and d.target_source != "label_text" else None
    if other:  # the default LRKD variant, learning from the other teacher's rationales
        default = [d.lrkd(d.default_extractor, d.default_mode, d.lam, s) for s in d.seeds]
        variants[default[0].name] = default[0]
        runs += train_variants(cfg, run_dir, default, teacher=other)
    report = _report(cfg, run_dir, runs) | {"probes": probes(run_dir)}
    out = run_dir / "student"
    write_json_atomic(report, out / "ablation.json")
    tag = _teacher_tag(cfg, other)
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


def evaluate_folder(cfg: RunConfig, run_dir: Path, student_dir: str) -> dict:
    """Metrics of any student folder on the run's test split (scored on Ray Data workers; predictions under
    <student_dir>/predictions/test)."""
    paths = prepare(cfg, run_dir)
    out = Path(student_dir) / "predictions" / "test"
    shutil.rmtree(out, ignore_errors=True)  # the folder's weights may have changed since
    return score_split(cfg, Path(student_dir), paths["test"], out, what="test", order=paths["test"])


def score_file(pairs: str, student_target: str, output: str, cfg: RunConfig | None = None, progress: bool = True) -> dict:
    """`thinkbroad score`: every pair of `pairs` (any file the reader accepts, labelled or not; the config's column
    mapping, joins and filter when `cfg` is given) scored by a student folder (or a run dir's best LRKD student)
    into the Parquet folder `output` (part-*.parquet, resumable). With labels, the metrics (accuracy, macro-F1,
    nDCG@10) are returned and written to `output/_metrics.json`."""
    from mpcot.labels import DEFAULT_ESCI_LABELS, Label
    from serve.launch import find_student
    from student.score import ScoreConfig, gains_of, metrics_from_parts, score_dataset, write_manifest as write_score_manifest
    from workflows.config import DataConfig
    from pairs.errors import DataError
    from pairs.scan import scan_pairs
    from pairs.write import input_files

    student = find_student(student_target)
    scfg = json.loads((student / "student_config.json").read_text())
    codes, persp = scfg["labels"], scfg["perspectives"]
    labels = list(cfg.labels) if cfg else [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
    if [lab.name for lab in labels] != codes:
        if cfg:
            raise DataError(f"the config's labels {[lab.name for lab in labels]} are not the student's {codes} "
                            f"({student}); score with the config the student was trained with")
        labels = codes  # not ESCI's: nDCG gains are the linear grades
    data = cfg.data.model_copy(update={"path": str(pairs)}) if cfg else DataConfig(path=str(pairs))
    out = Path(output)
    inputs = {str(f): fingerprint(f) for f in input_files(data)}
    key = hashlib.sha256(json.dumps([fingerprint(student / "model.safetensors"), data.model_dump(mode="json"), inputs],
                                    sort_keys=True).encode()).hexdigest()[:16]  # parts of another input are discarded
    done = out / "_manifest.json"
    if done.exists() and (m := json.loads(done.read_text())).get("key") == key and m.get("inputs") == inputs:
        log(f"score: up to date ({out})")
        return m["metrics"]
    t0 = time.time()
    start_attempt(out, key, "score")  # parts of another student or input are discarded
    done.unlink(missing_ok=True)
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if cfg is None and _canonical(Path(pairs)):  # a split `prepare` wrote: read as it is
        canonical, total = Path(pairs), pq.ParquetFile(pairs).metadata.num_rows
    else:
        scan = scan_pairs(data, codes, work, require_labels=False)
        canonical, total = work / "pairs.parquet", scan.index.num_rows
        writer = None
        for b in scan.batches():
            b = b.select(CANONICAL)
            writer = writer or pq.ParquetWriter(canonical, b.schema)
            writer.write_table(b, row_group_size=8192)
        writer.close()
    log(f"score: {total} pairs from {pairs} with {student}")
    ensure_ray()
    settings = cfg.distill.score if cfg else ScoreConfig()
    res = score_dataset(canonical, student, out, settings, total=total, progress=progress, what="score")
    metrics = _remote(metrics_from_parts)(out, codes, persp, gains_of(labels), mode=scfg["mode"])  # off the driver
    metrics.pop("predictions", None)
    write_json_atomic(metrics, out / "_metrics.json")
    write_score_manifest(out, {"key": key, "inputs": inputs, "student": str(student), "rows": res.rows,
                               "scored_now": res.scored_now, "reused": res.reused, "seconds": round(time.time() - t0, 2),
                               "metrics": metrics})
    shutil.rmtree(work, ignore_errors=True)
    log(f"score: {res.rows} pairs ({res.scored_now} scored now, {res.reused} resumed) -> {out}"
        + (f"; accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, nDCG@10 "
           f"{metrics['ranking']['ndcg@10'] if metrics['ranking']['ndcg@10'] is None else round(metrics['ranking']['ndcg@10'], 3)}"
           if "accuracy" in metrics else " (unlabelled: no metrics)"))
    return metrics


CANONICAL = ["pair_id", "query_id", "query", "title", "attributes", "label"]


def _canonical(path: Path) -> bool:
    """A Parquet file with the columns `prepare` writes (RUN_DIR/data/<split>.parquet)."""
    if path.suffix.lower() not in (".parquet", ".pq") or not path.is_file():
        return False
    try:
        return set(CANONICAL) <= set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid):  # not readable as Parquet: the reader reports it
        return False
