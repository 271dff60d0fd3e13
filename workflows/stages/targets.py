"""The distillation targets of the student stages: the trained teacher's rationales (or the gold label's text) for a
stratified sample of train and val pairs, embedded by the frozen embedder -> RUN_DIR/student/targets/<source>/, with
the informativeness probe (probe.py).

At scale the targets are a Parquet folder of one row per (pair, perspective) that has one, written by Ray Data and
rewritten in content order; the driver holds paths, ids of the sample and counts."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hardware.runtime import ensure_ray
from mpcot.generate import run_generation
from mpcot.tasks import PairSource, TaskPlan
from pairs.parquet import batches, write_parquet_atomic
from student.config import DistillConfig
from student.score import ONE_TASK_BYTES  # what one Ray task handles faster than a pool starts
from workflows.artifacts import (attempt_key, fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic,
                                 write_manifest)
from workflows.config import RunConfig
from workflows.models import resolve_model
from workflows.stages.common import log, log_up_to_date, remote
from workflows.stages.generate import judge_spec
from workflows.stages.prepare import prepare
from workflows.stages.probe import informativeness


TARGET_COLUMNS = ["pair_id", "perspective", "split", "rationale", "predicted_label", "gold_label", "parse_ok", "correct"]


def _teacher_model(cfg: RunConfig, run_dir: Path, choice: str) -> tuple[str, str]:
    if choice in ("dpo", "sft"):
        from workflows.stages import teacher as teacher_stage

        path = teacher_stage.dpo(cfg, run_dir) if choice == "dpo" else teacher_stage.sft(cfg, run_dir)
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


def teacher_tag(cfg: RunConfig, teacher: str | None) -> str:
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


def targets_folder(cfg: RunConfig, run_dir: Path, source: str, teacher: str | None) -> Path:
    """RUN_DIR/student/targets/<source>[-<teacher>teacher][-cv<k>]: the teacher's tag only for an LLM source;
    cross-validation samples every split, so its targets sit beside the plain run's, not in their place."""
    d = cfg.distill
    cv = f"-cv{d.cv_folds}" if d.cv_folds > 1 else ""
    tag = teacher_tag(cfg, teacher or d.teacher) if source != "label_text" else ""
    return run_dir / "student" / "targets" / (source + tag + cv)


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
    out = targets_folder(cfg, run_dir, source, teacher)
    path = out / "targets.parquet"
    split_paths = prepare(cfg, run_dir)
    teacher_path, teacher_name = _teacher_model(cfg, run_dir, teacher) if llm else ("", "")
    key = targets_key(cfg, teacher if llm else "", source)
    inputs = {s: fingerprint(split_paths[s]) for s in (("train", "val", "test") if d.cv_folds > 1 else ("train", "val"))}
    if llm:
        inputs["teacher"] = fingerprint(teacher_path)
    if is_fresh(out, key, inputs):
        log_up_to_date(f"targets [{source}]", out)
        return path
    invalidate(out)
    t0 = time.time()
    ensure_ray()
    ids = target_pairs(cfg, split_paths)
    if llm:
        rationales = _teacher_rationales(cfg, split_paths, ids, out, attempt_key(key, inputs), source, teacher_path,
                                         teacher_name)
        n = _embed(cfg, rationales, path)
    else:
        n = _label_text(cfg, split_paths, ids, path)
    probe = remote(informativeness)(str(path), [p.name for p in cfg.perspectives], d.target_filter)
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


def _teacher_rationales(cfg: RunConfig, split_paths: dict[str, Path], ids: dict, out: Path, key: str, source: str,
                        teacher_path: str, teacher_name: str) -> Path:
    """The teacher's rationales for the sampled pairs (a Parquet folder holding TARGET_COLUMNS)."""
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
    return Path(run_generation(tasks, out, spec, gen).rationales_path)


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


def _label_text(cfg: RunConfig, split_paths: dict[str, Path], ids: dict, path: Path) -> int:
    """The control target: '<title>: <description>' of the pair's gold label, the same for every perspective, for
    the sampled pairs, with its embedding (the label texts are embedded once; no LLM), written to the Parquet folder
    `path`; returns the rows. Splits of at most ONE_TASK_BYTES in one Ray task, larger ones through Ray Data."""
    import ray

    from student.examples import input_bytes

    text = {lab.name: f"{lab.title}: {lab.description}" if lab.description else lab.title for lab in cfg.labels}
    d = cfg.distill
    persp = [p.name for p in cfg.perspectives]
    encoder = resolve_model(d.embedder)
    log(f"targets [label_text]: gold label descriptions as every (pair, perspective)'s rationale, {len(text)} texts "
        "embedded once, no LLM")
    if input_bytes([split_paths[s] for s in ids]) <= ONE_TASK_BYTES:
        return _canonical_folder(path, lambda tmp: remote(_label_text_in_one_task)(
            {s: str(split_paths[s].resolve()) for s in ids}, ids, str(tmp.resolve()), encoder, d.embed_pooling, text, persp))
    vectors = dict(zip(text, remote(_embed_texts)(encoder, d.embed_pooling, list(text.values()))))
    parts = []
    for split in ids:
        ds = ray.data.read_parquet(str(split_paths[split].resolve())).select_columns(["pair_id", "label"])
        if ids[split] is not None:
            ref = ray.put(ids[split])
            ds = ds.map_batches(_in_sample, fn_kwargs={"ids_ref": ref}, batch_format="pyarrow")
        parts.append(ds.map_batches(_label_text_batch, fn_kwargs={"split": split, "perspectives": persp, "text": text,
                                                                  "vectors": vectors}, batch_format="pyarrow"))
    return _write_parquet_folder(parts[0].union(*parts[1:]), path)


def _label_text_in_one_task(splits: dict[str, str], ids: dict, tmp: str, encoder: str, pooling: str,
                            text: dict[str, str], persp: list[str]) -> None:
    """_label_text's path for small splits: the sampled pairs' rows, a batch at a time, into one file under `tmp`."""
    vectors = dict(zip(text, _embed_texts(encoder, pooling, list(text.values()))))

    def rows():
        for split, path in splits.items():
            for batch in batches(path, ["pair_id", "label"]):
                if ids[split] is not None:
                    batch = batch.filter(pc.is_in(batch.column("pair_id"), value_set=ids[split]))
                yield _label_text_batch(batch, split, persp, text, vectors)

    _write_tables(tmp, rows())


def _in_sample(batch: pa.Table, ids_ref) -> pa.Table:
    import ray

    return batch.filter(pc.is_in(batch.column("pair_id"), value_set=ray.get(ids_ref)))


def _embed(cfg: RunConfig, rationales: Path, path: Path) -> int:
    """The rationales with the frozen embedder's vector of each, written to the Parquet folder `path` (named and
    ordered by content); returns the rows. A Ray Data actor pool embeds them (each distinct text of a batch once);
    a small folder (<= ONE_TASK_BYTES) in one Ray task on the embedder's resources, which a warm worker process
    runs without starting an actor (the smoke run's target set: 13 -> 7 s)."""
    import ray

    from student.embed import RationaleEmbedder, embedder_placement
    from student.examples import input_bytes

    d = cfg.distill
    actors, resources = embedder_placement(ray.cluster_resources().get("GPU", 0))
    encoder = resolve_model(d.embedder)
    if input_bytes([rationales]) <= ONE_TASK_BYTES:
        return _canonical_folder(path, lambda tmp: ray.get(ray.remote(**resources)(_embed_in_one_task).remote(
            str(rationales.resolve()), str(tmp.resolve()), encoder, d.embed_pooling, d.embed_batch_size)))
    rows = ray.data.read_parquet(str(rationales.resolve())).select_columns(TARGET_COLUMNS).map_batches(
        RationaleEmbedder, fn_constructor_kwargs={"encoder_path": encoder, "pooling": d.embed_pooling},
        batch_size=d.embed_batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), **resources)
    return _write_parquet_folder(rows, path)


def _embed_in_one_task(rationales: str, tmp: str, encoder: str, pooling: str, batch_size: int) -> None:
    """_embed's path for a small folder: its rows, `batch_size` at a time, with their embeddings, into one file."""
    from pairs.parquet import parquet_files, read_rows
    from student.embed import RationaleEmbedder

    embedder = RationaleEmbedder(encoder, pooling=pooling)
    _write_tables(tmp, (embedder(b) for b in read_rows(parquet_files(rationales), columns=TARGET_COLUMNS, batch_rows=batch_size)))


def _write_tables(tmp: str, tables) -> None:
    """Tables of one schema, as they come, into the file tmp/part-0.parquet (none: an empty folder)."""
    Path(tmp).mkdir(parents=True, exist_ok=True)
    writer = None
    for t in tables:
        writer = writer or pq.ParquetWriter(Path(tmp) / "part-0.parquet", t.schema)
        writer.write_table(t)
    if writer:
        writer.close()


def _write_parquet_folder(ds, path: Path) -> int:
    """Writes a Ray Dataset to the Parquet folder `path`, named and ordered by content (a Ray task rewrites Ray
    Data's output, whose file names are random and whose row order follows task completion, into hash buckets of
    pair_id sorted by (pair_id, perspective)): the same targets give the same files, so the folder's fingerprint,
    the centroids' sums and the probe's sample do not change with scheduling. Returns its rows."""
    return _canonical_folder(path, lambda tmp: ds.write_parquet(str(tmp.resolve())))


def _canonical_folder(path: Path, write) -> int:
    """`write(tmp)` writes a Parquet folder; its rows are rewritten to `path` named and ordered by content (see
    _write_parquet_folder). Returns the rows."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    final = path.with_name(f".{path.name}.canonical")
    from pairs.parquet import canonical_parquet

    n = remote(canonical_parquet)(str(tmp), str(final), ["pair_id", "perspective"])
    shutil.rmtree(path, ignore_errors=True)
    final.rename(path)
    shutil.rmtree(tmp, ignore_errors=True)
    return n
