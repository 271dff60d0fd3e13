"""Student stages: distillation targets (teacher rationales -> frozen embeddings, with an informativeness probe),
LRKD training of every variant side by side, evaluation (test once, validation for selection and latent
fidelity), paired verdicts against lambda = 0, and the ablation sweep."""
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
import pyarrow.parquet as pq

from mpcot.generate import expand_tasks, run_generation, write_parquet_atomic
from student.config import DistillConfig
from student.data import build_examples
from student.evaluate import aggregate, evaluate, latent_fidelity, paired_bootstrap
from student.train import TRAINED, Variant, predict
from workflows.artifacts import (fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic, write_manifest,
                                 write_text_atomic)
from workflows.config import RunConfig
from workflows.models import resolve_model
from workflows.runtime import ensure_ray
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


def target_pairs(cfg: RunConfig, paths: dict[str, Path]) -> dict[str, pa.Table]:
    """The train pairs that get targets (for the guidance term) and the val pairs that get them (for latent
    fidelity only), each a stratified sample."""
    d = cfg.distill
    return {"train": stratified_sample(pq.read_table(paths["train"]), d.max_target_pairs, cfg.seed),
            "val": stratified_sample(pq.read_table(paths["val"]), d.fidelity_pairs, cfg.seed + 1)}


def targets(cfg: RunConfig, run_dir: Path, source: str | None = None, teacher: str | None = None) -> Path:
    """RUN_DIR/student/targets/<source>[-<teacher>teacher]/targets.parquet: one row per (pair, perspective) of the
    sampled train and val pairs: the rationale, its labels and flags, and its L2-normalised embedding.

    teacher / gold_conditioned: the teacher (`distill.teacher`, or `teacher` for the ablation) writes one greedy
    rationale per perspective, told the gold label when gold_conditioned; label_text: every perspective's target is
    the embedding of the gold label's description. The manifest holds the informativeness probe.
    """
    d: DistillConfig = cfg.distill
    source, teacher = source or d.target_source, teacher or d.teacher
    llm = source != "label_text"
    out = run_dir / "student" / "targets" / (source + (_teacher_tag(cfg, teacher) if llm else ""))
    split_paths = prepare(cfg, run_dir)
    pairs = target_pairs(cfg, split_paths)
    teacher_path, teacher_name = _teacher_model(cfg, run_dir, teacher) if llm else ("", "")
    key = targets_key(cfg, teacher if llm else "", source)
    inputs = {"train": fingerprint(split_paths["train"]), "val": fingerprint(split_paths["val"])}
    if llm:
        inputs["teacher"] = fingerprint(teacher_path)
    if is_fresh(out, key, inputs):
        log(f"targets [{source}]: up to date ({out})")
        return out / "targets.parquet"
    invalidate(out)
    t0 = time.time()
    ensure_ray()
    if llm:
        rationales = _teacher_rationales(cfg, pairs, out, key, source, teacher_path, teacher_name)
    else:
        rationales = _label_text_rows(cfg, pairs)
    table = _embed(cfg, rationales)
    path = out / "targets.parquet"
    write_parquet_atomic(table, path)
    probe = informativeness(table, [p.name for p in cfg.perspectives], d.target_filter)
    write_json_atomic(probe, out / "probe.json")
    write_manifest(out, "targets", key, inputs, t0, rows=table.num_rows, source=source, teacher=teacher_name or None,
                   embedder=d.embedder, pairs={s: t.num_rows for s, t in pairs.items()}, probe=probe)
    shutil.rmtree(out / "parts", ignore_errors=True)
    log(f"targets [{source}]: {table.num_rows} rationale embeddings ({d.embedder}) -> {path}")
    log(f"targets [{source}]: probe (5-fold logistic regression, embeddings -> gold label, macro-F1 vs majority): "
        + ", ".join(f"{k} {v['macro_f1']:.2f} vs {v['majority_macro_f1']:.2f}" if "macro_f1" in v else f"{k}: {v['note']}"
                    for k, v in probe.items()))
    return path


def _teacher_rationales(cfg: RunConfig, pairs: dict[str, pa.Table], out: Path, key: str, source: str,
                        teacher_path: str, teacher_name: str) -> pa.Table:
    tasks = pa.concat_tables([expand_tasks(t, cfg.perspectives, 1, split) for split, t in pairs.items()])
    gen = cfg.generation.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    spec = dataclasses.replace(judge_spec(cfg, teacher_path, teacher_name, cfg.perspectives, gen),
                               gold_hint=source == "gold_conditioned")
    log(f"targets [{source}]: {teacher_name} teacher writes {tasks.num_rows} rationales ({pairs['train'].num_rows} train + "
        f"{pairs['val'].num_rows} val pairs x {len(cfg.perspectives)} perspectives"
        + ("; told the gold label" if spec.gold_hint else "") + ")")
    start_attempt(out / "parts", key, "targets")
    res = run_generation(tasks, out, spec, gen)
    return pq.read_table(res.rationales_path, columns=TARGET_COLUMNS)


def _label_text_rows(cfg: RunConfig, pairs: dict[str, pa.Table]) -> pa.Table:
    """The control target: '<title>: <description>' of the pair's gold label, the same for every perspective."""
    text = {lab.name: f"{lab.title}: {lab.description}" if lab.description else lab.title for lab in cfg.labels}
    rows = [{"pair_id": p["pair_id"], "perspective": k.name, "split": split, "rationale": text[p["label"]],
             "predicted_label": p["label"], "gold_label": p["label"], "parse_ok": True, "correct": True}
            for split, t in pairs.items() for p in t.to_pylist() for k in cfg.perspectives]
    log(f"targets [label_text]: gold label descriptions for {len(rows)} (pair, perspective) rows, no LLM")
    return pa.Table.from_pylist(rows)


def _embed(cfg: RunConfig, rationales: pa.Table) -> pa.Table:
    """Adds the frozen embedder's vector of each rationale (Ray Data actor; unparsed rows embed as empty text)."""
    import ray

    from student.embed import RationaleEmbedder

    d = cfg.distill
    blocks = [rationales.slice(i, d.embed_batch_size) for i in range(0, rationales.num_rows, d.embed_batch_size)]
    embedded = ray.data.from_arrow(blocks).map_batches(
        RationaleEmbedder, fn_constructor_kwargs={"encoder_path": resolve_model(d.embedder), "pooling": d.embed_pooling},
        batch_size=d.embed_batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
    )
    emb = pa.concat_tables(list(embedded.iter_batches(batch_size=None, batch_format="pyarrow")))
    by_key = {(p, k): i for i, (p, k) in enumerate(zip(emb.column("pair_id").to_pylist(), emb.column("perspective").to_pylist()))}
    order = [by_key[(p, k)] for p, k in zip(rationales.column("pair_id").to_pylist(), rationales.column("perspective").to_pylist())]
    return rationales.append_column("embedding", emb.column("embedding").take(pa.array(order, pa.int64())))


def keep_target(row: dict, target_filter: str) -> bool:
    """correct: the rationale's label is the gold label (the SFT consistency rule); parsed: any parsed answer; all."""
    if target_filter == "all":
        return True
    return bool(row["parse_ok"]) and (target_filter == "parsed" or bool(row["correct"]))


def informativeness(table: pa.Table, perspectives: list[str], target_filter: str, folds: int = 5) -> dict:
    """Per perspective, on the train rows the filter keeps: macro-F1 of a 5-fold cross-validated logistic
    regression from the rationale embedding to the gold label, against always answering the majority label.
    A probe no better than the majority says the targets cannot teach the label, whatever else they carry."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rows = [r for r in table.to_pylist() if r["split"] == "train" and keep_target(r, target_filter)]
    out = {}
    for name in perspectives:
        mine = [r for r in rows if r["perspective"] == name]
        y = np.asarray([r["gold_label"] for r in mine])
        classes, counts = np.unique(y, return_counts=True) if len(y) else (np.array([]), np.array([]))
        result = {"rows": len(mine), "label_counts": dict(zip(classes.tolist(), counts.tolist()))}
        usable = classes[counts >= 2]
        if len(usable) < 2:
            out[name] = result | {"note": "fewer than two labels with two rows each: nothing to probe"}
            continue
        keep = np.isin(y, usable)
        x, y = np.asarray([r["embedding"] for r, k in zip(mine, keep) if k], dtype=np.float32), y[keep]
        k = int(min(folds, np.unique(y, return_counts=True)[1].min()))
        pred = cross_val_predict(LogisticRegression(max_iter=2000, class_weight="balanced"), x, y,
                                 cv=StratifiedKFold(k, shuffle=True, random_state=0))
        majority = np.full_like(y, classes[np.argmax(counts)])
        out[name] = result | {"folds": k, "macro_f1": float(f1_score(y, pred, average="macro")),
                              "majority_macro_f1": float(f1_score(y, majority, average="macro", zero_division=0))}
    return out


class StudentData:
    """The train/val/test example dicts each variant trains on, built once per target source."""

    def __init__(self, cfg: RunConfig, run_dir: Path, teacher: str | None = None):
        self.cfg, self.run_dir, self.teacher = cfg, run_dir, teacher
        self.paths = prepare(cfg, run_dir)
        self.splits = {s: pq.read_table(self.paths[s]).to_pylist() for s in ("train", "val", "test")}
        self.codes = [lab.name for lab in cfg.labels]
        self.persp = [p.name for p in cfg.perspectives]
        self._built: dict = {}
        self._paths: dict[str, Path] = {}

    def target_path(self, source: str) -> Path:
        if source not in self._paths:
            self._paths[source] = targets(self.cfg, self.run_dir, source, self.teacher)
        return self._paths[source]

    def rows(self, source: str) -> list[dict]:
        return pq.read_table(self.target_path(source)).to_pylist()

    def examples(self, source: str) -> tuple[dict, dict, dict, list]:
        """train (targets after the filter, teacher votes), val (targets for fidelity only), test (labels only),
        and the per-perspective centroids of the train targets (the attribution reference at inference)."""
        if source in self._built:
            return self._built[source]
        rows = self.rows(source)
        kept = [r for r in rows if keep_target(r, self.cfg.distill.target_filter)]
        dim = len(rows[0]["embedding"])
        vecs = {s: {(r["pair_id"], r["perspective"]): np.asarray(r["embedding"], dtype=np.float32) for r in kept if r["split"] == s}
                for s in ("train", "val")}
        # the logit-KD baseline reads what the teacher answered, right or wrong
        teacher_rows = rows if source == "teacher" else self.rows("teacher")
        votes = {(r["pair_id"], r["perspective"]): r["predicted_label"] for r in teacher_rows if r["split"] == "train" and r["parse_ok"]}
        train = build_examples(self.splits["train"], self.codes, self.persp, vecs["train"], votes, dim)
        val = build_examples(self.splits["val"], self.codes, self.persp, vecs["val"], None, dim)
        test = build_examples(self.splits["test"], self.codes, self.persp, None, None, dim)
        centroids = []
        for k, name in enumerate(self.persp):
            m = train["target_mask"][:, k] > 0
            centroids.append(train["targets"][m, k].mean(0).tolist() if m.any() else [0.0] * dim)
        self._built[source] = (train, val, test, centroids)
        return self._built[source]

    def for_variant(self, v: Variant) -> tuple[dict, dict, dict, list]:
        """The examples of `v`'s target source, with the targets of perspectives outside `v.target_perspectives`
        masked out."""
        train, val, test, centroids = self.examples(v.target_source or self.cfg.distill.target_source)
        if v.target_perspectives:
            keep = np.isin(self.persp, v.target_perspectives).astype(np.float32)
            train = {**train, "target_mask": train["target_mask"] * keep}
            val = {**val, "target_mask": val["target_mask"] * keep}
        return train, val, test, centroids


def train_variants(cfg: RunConfig, run_dir: Path, variants: list[Variant], teacher: str | None = None) -> list[dict]:
    """Train + evaluate each variant/seed (each cached in its own folder); returns [{variant, seed, metrics}].

    The ones not up to date train one after another in one Ray Train worker group, then each is scored: the test
    split once (with per-pair predictions), `val` (the reloaded best model on validation: what selection uses),
    `fidelity` (validation pairs) and `diagnostics` (first and last epoch). `teacher`: learn from another teacher's
    targets than `distill.teacher`; the variant names get a suffix."""
    from student.train import StudentJob, train_students

    tag = _teacher_tag(cfg, teacher)
    data = StudentData(cfg, run_dir, teacher)
    settings = cfg.distill.train
    base_key = cfg.section_hash("labels", "perspectives", "data")
    splits = {s: fingerprint(data.paths[s]) for s in ("train", "val", "test")}
    folder = {id(v): run_dir / "student" / "variants" / f"{v.name}{tag}-seed{v.seed}" for v in variants}
    # one dataset per (target source, perspectives kept); students that share one share its copy
    data_key = {id(v): "|".join([v.target_source or cfg.distill.target_source, *(v.target_perspectives or [])]) for v in variants}
    todo = []
    for v in variants:
        out = folder[id(v)]
        reads = [] if v.kind == "vanilla" or (v.kind == "lrkd" and v.lam == 0) else \
            ["teacher"] if v.kind == "logit_kd" else [v.target_source or cfg.distill.target_source]
        key = hashlib.sha256(json.dumps([base_key, dataclasses.asdict(v), settings.model_dump(), cfg.distill.backbone,
                                         cfg.distill.target_filter if reads else None, tag if reads else ""],
                                        sort_keys=True).encode()).hexdigest()[:16]
        inputs = splits | {f"targets_{s}": fingerprint(data.target_path(s)) for s in reads}
        if not is_fresh(out, key, inputs):
            invalidate(out)
            start_attempt(out, key, f"student {v.name}{tag}")  # a changed config discards the old student
            todo.append((v, out, key, inputs))
    if todo:
        ensure_ray()
        t0 = time.time()
        datasets = {}
        for v, *_ in todo:
            if data_key[id(v)] not in datasets:
                train, val, _, centroids = data.for_variant(v)
                datasets[data_key[id(v)]] = {"train": train, "val": val, "centroids": centroids}
        group = hashlib.sha256(json.dumps(sorted((str(o), k) for _, o, k, _ in todo)).encode()).hexdigest()[:12]
        storage = run_dir / "student" / "trainer" / group
        log(f"students: {len(todo)} to train ({sum((o / TRAINED).exists() for _, o, *_ in todo)} already trained), one after "
            f"another in one Ray Train worker group ({settings.num_workers} workers); progress per epoch below")
        train_students([StudentJob(v, str(o), data_key[id(v)]) for v, o, *_ in todo], datasets, settings,
                       resolve_model(cfg.distill.backbone), data.codes, data.persp, storage)
        for v, out, key, inputs in todo:
            history = json.loads((out / "history.json").read_text())
            train, val, test, _ = data.for_variant(v)
            write_json_atomic(_score(out / "best", train, val, test, data, v, history), out / "eval.json")
            write_manifest(out, "student", key, inputs, t0, epochs=len(history),
                           best_val_macro_f1=max(h["val_macro_f1"] for h in history))
        shutil.rmtree(storage, ignore_errors=True)
    return [{"variant": v.name + tag, "seed": v.seed, "metrics": json.loads((folder[id(v)] / "eval.json").read_text())}
            for v in variants]


def _score(best: Path, train: dict, val: dict, test: dict, data: StudentData, v: Variant, history: list[dict]) -> dict:
    """Test metrics (once), validation metrics of the reloaded model, latent fidelity on validation, diagnostics."""
    from transformers import AutoTokenizer

    from student.model import LRKDStudent

    model = LRKDStudent.from_pretrained(best)
    tok = AutoTokenizer.from_pretrained(best)
    max_length = model.cfg.max_length
    metrics = evaluate(model, test, tok, data.codes, data.persp, max_length)
    val_out = predict(model, val, tok, max_length)
    val_metrics = evaluate(model, val, tok, data.codes, data.persp, max_length, out=val_out)
    metrics["val"] = {k: val_metrics[k] for k in ("n", "accuracy", "macro_f1", "per_class_f1")}
    metrics["extractor_params"] = model.extractor_parameters()
    metrics["selected_epoch"] = json.loads((best / "selection.json").read_text())["epoch"]
    if val_out["projected"] is not None and v.lam > 0:
        metrics["fidelity"] = latent_fidelity(val_out["projected"], val["targets"], val["target_mask"], train["targets"],
                                              train["target_mask"], model.cfg.mode, data.persp)
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


def verdicts(runs: list[dict], codes: list[str], resamples: int, test_gold: list[int], against: dict[str, str] | None = None) -> dict:
    """Paired by seed on the test split: mean macro-F1 difference with a bootstrap 95% interval and a verdict, for
    each variant -> control in `against` (default: every LRKD variant against its lambda = 0 twin, and logit-KD
    against vanilla)."""
    preds: dict[str, dict[int, list[int]]] = {}
    for r in runs:
        preds.setdefault(r["variant"], {})[r["seed"]] = r["metrics"]["predictions"]
    if against is None:
        against = {name: _twin(name) for name in preds} | {"logit_kd": "vanilla"}
    out = {}
    for name, base in against.items():
        if base and name in preds and base in preds:
            out[name] = {"against": base, **paired_bootstrap(test_gold, preds[name], preds[base], len(codes), resamples)}
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
    test = pq.read_table(prepare(cfg, run_dir)["test"]).column("label").to_pylist()
    gold = [codes.index(c) for c in test]
    names = {r["variant"] for r in runs}
    # one perspective's targets alone against all three (the same variant otherwise)
    alone = {n: n.split("-only_")[0] for n in names if "-only_" in n}
    return {"split": "test", "test_pairs": len(gold), "variants": aggregate(runs, codes),
            "verdicts": verdicts(runs, codes, cfg.distill.bootstrap_resamples, gold),
            "perspective_verdicts": verdicts(runs, codes, cfg.distill.bootstrap_resamples, gold, alone) if alone else {},
            "diagnostics": _summaries(runs), "runs": runs}


def probes(run_dir: Path) -> dict:
    """The informativeness probe of every target source written so far."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "student" / "targets").glob("*/probe.json"))}


def distill(cfg: RunConfig, run_dir: Path) -> Path:
    """Targets + every main variant side by side -> RUN_DIR/student/metrics.json (test metrics, the paired verdicts,
    validation metrics, diagnostics, the probes)."""
    runs = train_variants(cfg, run_dir, cfg.distill.main_variants())
    report = _report(cfg, run_dir, runs) | {"probes": probes(run_dir)}
    path = run_dir / "student" / "metrics.json"
    write_json_atomic(report, path)
    log("student (test, mean +- std over seeds):\n" + metrics_table(report["variants"]))
    log("paired verdicts (test macro-F1 difference, 95% bootstrap interval):\n" + verdict_lines(report["verdicts"]))
    return path


def verdict_lines(v: dict) -> str:
    return "\n".join(f"- {name} vs {r['against']}: {r['mean_diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] over "
                     f"{len(r['seeds'])} seeds x {r['test_pairs']} test pairs: {r['verdict']}" for name, r in v.items())


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
    head = "| variant | seeds | val macro-F1 | test accuracy | test macro-F1 | " + " | ".join(f"F1 {lab}" for lab in labels) + " |"
    lines = [head, "|" + "---|" * (5 + len(labels))]
    for name, s in agg.items():
        cells = " | ".join(f"{s['per_class_f1'][lab]['mean']:.3f}" for lab in labels)
        val = f"{s['val_macro_f1']['mean']:.3f} ± {s['val_macro_f1']['std']:.3f}" if "val_macro_f1" in s else ""
        lines.append(f"| {name} | {len(s['seeds'])} | {val} | {s['accuracy']['mean']:.3f} ± {s['accuracy']['std']:.3f} | "
                     f"{s['macro_f1']['mean']:.3f} ± {s['macro_f1']['std']:.3f} | {cells} |")
    return "\n".join(lines)


def evaluate_folder(cfg: RunConfig, run_dir: Path, student_dir: str) -> dict:
    """Metrics of any student folder on the run's test split."""
    from transformers import AutoTokenizer

    from student.model import LRKDStudent

    paths = prepare(cfg, run_dir)
    codes, persp = [lab.name for lab in cfg.labels], [p.name for p in cfg.perspectives]
    test = build_examples(pq.read_table(paths["test"]).to_pylist(), codes, persp)
    model = LRKDStudent.from_pretrained(student_dir)
    return evaluate(model, test, AutoTokenizer.from_pretrained(student_dir), codes, persp, model.cfg.max_length)
