"""Student stages: distillation targets (teacher rationales -> frozen embeddings), LRKD training of every variant
side by side, evaluation on the test split, and the ablation sweep."""
from __future__ import annotations

import csv
import hashlib
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
from student.evaluate import aggregate, evaluate
from student.train import Variant, train_student
from workflows.artifacts import fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic, write_manifest
from workflows.config import RunConfig
from workflows.models import resolve_model
from workflows.runtime import ensure_ray
from workflows.stages import judge_spec, log, prepare


def _teacher_model(cfg: RunConfig, run_dir: Path, choice: str) -> tuple[str, str]:
    if choice in ("dpo", "sft"):
        from workflows import teacher_stages

        path = teacher_stages.dpo(cfg, run_dir) if choice == "dpo" else teacher_stages.sft(cfg, run_dir)
        return str(path), choice
    if choice == "base":
        return resolve_model(cfg.teacher.model), "base"
    return resolve_model(choice), choice


def targets_key(cfg: RunConfig, teacher: str) -> str:
    """What the targets depend on: the teacher's prompts and sampling, and the distill settings that shape them
    (not the student's training settings or the variants, which reuse the same targets)."""
    d = cfg.distill
    parts = [cfg.section_hash("teacher", "generation", "labels", "perspectives"), teacher, d.max_target_pairs,
             d.embedder, d.embed_pooling]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _teacher_tag(cfg: RunConfig, teacher: str | None) -> str:
    """'' for the configured teacher; '-<teacher>teacher' for another one (ablation), in folder and variant names."""
    return "" if teacher in (None, cfg.distill.teacher) else f"-{teacher}teacher"


def targets(cfg: RunConfig, run_dir: Path, teacher: str | None = None) -> Path:
    """RUN_DIR/student/targets/targets.parquet: (pair_id, perspective, embedding) for the student's train pairs.

    `teacher`: another teacher than `distill.teacher` (the ablation's SFT vs DPO), written to targets-<teacher>teacher/.
    """
    d: DistillConfig = cfg.distill
    teacher = teacher or d.teacher
    teacher_path, teacher_name = _teacher_model(cfg, run_dir, teacher)
    out = run_dir / "student" / ("targets" + _teacher_tag(cfg, teacher))
    split = prepare(cfg, run_dir)["train"]
    key = targets_key(cfg, teacher)
    inputs = {"teacher": fingerprint(teacher_path), "train": fingerprint(split)}
    if is_fresh(out, key, inputs):
        log(f"targets: up to date ({out})")
        return out / "targets.parquet"
    invalidate(out)
    t0 = time.time()
    pairs = pq.read_table(split)
    if d.max_target_pairs:
        pairs = pairs.slice(0, d.max_target_pairs)
    tasks = expand_tasks(pairs, cfg.perspectives, 1, "train")
    gen = cfg.generation.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    log(f"targets: {teacher_name} teacher writes {tasks.num_rows} rationales ({pairs.num_rows} pairs x {len(cfg.perspectives)} perspectives)")
    ensure_ray()
    start_attempt(out / "parts", key, "targets")
    res = run_generation(tasks, out, judge_spec(cfg, teacher_path, teacher_name, cfg.perspectives, gen), gen)
    rationales = pq.read_table(res.rationales_path, columns=["pair_id", "perspective", "rationale", "predicted_label"])
    import ray

    from student.embed import RationaleEmbedder  # noqa: E402

    embedder_path = resolve_model(d.embedder)
    blocks = [rationales.slice(i, d.embed_batch_size) for i in range(0, rationales.num_rows, d.embed_batch_size)]
    embedded = ray.data.from_arrow(blocks).map_batches(
        RationaleEmbedder, fn_constructor_kwargs={"encoder_path": embedder_path, "pooling": d.embed_pooling}, batch_size=d.embed_batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
    )
    table = pa.concat_tables(list(embedded.iter_batches(batch_size=None, batch_format="pyarrow")))
    labels = {(r["pair_id"], r["perspective"]): r["predicted_label"] for r in rationales.to_pylist()}
    table = table.append_column("predicted_label", pa.array([labels[(p, k)] for p, k in zip(
        table.column("pair_id").to_pylist(), table.column("perspective").to_pylist())], pa.string()))
    path = out / "targets.parquet"
    write_parquet_atomic(table, path)
    write_manifest(out, "targets", key, inputs, t0, rows=table.num_rows, teacher=teacher_name, embedder=d.embedder)
    shutil.rmtree(out / "parts", ignore_errors=True)
    log(f"targets: {table.num_rows} rationale embeddings ({d.embedder}) -> {path}")
    return path


def _examples(cfg: RunConfig, run_dir: Path, target_path: Path) -> tuple[dict, dict, dict, list]:
    paths = prepare(cfg, run_dir)
    rows = pq.read_table(target_path).to_pylist()
    vecs = {(r["pair_id"], r["perspective"]): np.asarray(r["embedding"], dtype=np.float32) for r in rows}
    votes = {(r["pair_id"], r["perspective"]): r["predicted_label"] for r in rows}
    dim = len(rows[0]["embedding"])
    codes, persp = [lab.name for lab in cfg.labels], [p.name for p in cfg.perspectives]
    splits = {s: build_examples(pq.read_table(paths[s]).to_pylist(), codes, persp, vecs, votes, dim) for s in ("train", "val", "test")}
    # per-perspective centroid of the teacher's rationale embeddings: the attribution reference at inference
    centroids = [np.mean([v for (_, k), v in vecs.items() if k == name], axis=0).tolist() for name in persp]
    return splits["train"], splits["val"], splits["test"], centroids


def train_variants(cfg: RunConfig, run_dir: Path, variants: list[Variant], teacher: str | None = None) -> list[dict]:
    """Train + evaluate each variant/seed (each cached in its own folder); returns [{variant, seed, metrics}].

    `teacher`: learn from another teacher's targets than `distill.teacher`; the variant names get a suffix."""
    from transformers import AutoTokenizer

    from student.model import LRKDStudent

    tag = _teacher_tag(cfg, teacher)
    target_path = targets(cfg, run_dir, teacher)
    train, val, test, centroids = _examples(cfg, run_dir, target_path)
    encoder = resolve_model(cfg.distill.backbone)
    codes, persp = [lab.name for lab in cfg.labels], [p.name for p in cfg.perspectives]
    base_key = cfg.section_hash("labels", "perspectives", "data")
    settings = cfg.distill.train
    runs = []
    ensure_ray()
    for i, v in enumerate(variants, 1):
        name = v.name + tag
        out = run_dir / "student" / "variants" / f"{name}-seed{v.seed}"
        key = hashlib.sha256(json.dumps([base_key, v.__dict__, settings.model_dump(), cfg.distill.backbone],
                                        sort_keys=True).encode()).hexdigest()[:16]
        inputs = {"targets": fingerprint(target_path)}
        if not is_fresh(out, key, inputs):
            invalidate(out)
            start_attempt(out / "ray", key, f"student {v.name}")
            t0 = time.time()
            log(f"student [{i}/{len(variants)}] {name} seed {v.seed}")
            history = train_student(v, settings, train, val, encoder, codes, persp, centroids, out)
            model = LRKDStudent.from_pretrained(out / "best")
            metrics = evaluate(model, test, AutoTokenizer.from_pretrained(out / "best"), codes, persp, settings.max_length)
            metrics["extractor_params"] = model.extractor_parameters()
            write_json_atomic(metrics, out / "eval.json")
            write_manifest(out, "student", key, inputs, t0, epochs=len(history),
                           best_val_macro_f1=max(h["val_macro_f1"] for h in history))
        runs.append({"variant": name, "seed": v.seed, "metrics": json.loads((out / "eval.json").read_text())})
    return runs


def distill(cfg: RunConfig, run_dir: Path) -> Path:
    """Targets + every main variant side by side -> RUN_DIR/student/metrics.json."""
    runs = train_variants(cfg, run_dir, cfg.distill.main_variants())
    codes = [lab.name for lab in cfg.labels]
    report = {"split": "test", "variants": aggregate(runs, codes), "runs": runs}
    path = run_dir / "student" / "metrics.json"
    write_json_atomic(report, path)
    log("student (test, mean +- std over seeds):\n" + metrics_table(report["variants"]))
    return path


def _other_teacher(cfg: RunConfig, run_dir: Path) -> str | None:
    """The SFT teacher when the student learns from DPO (or the reverse, when a DPO model exists): the ablation's
    teacher comparison. None for a base or folder teacher."""
    other = {"dpo": "sft", "sft": "dpo"}.get(cfg.distill.teacher)
    return other if other and (run_dir / "teacher" / other / "manifest.json").exists() else None


def ablate(cfg: RunConfig, run_dir: Path) -> Path:
    """extractor x mode x lambda (and SFT vs DPO teacher) -> RUN_DIR/student/ablation.{csv,md,png}."""
    d = cfg.distill
    runs = train_variants(cfg, run_dir, d.main_variants()[:2] + d.ablation_variants())
    other = _other_teacher(cfg, run_dir) if d.ablate_teacher else None
    if other:  # the default LRKD variant, learning from the other teacher's rationales
        default = [v for v in d.main_variants() if v.kind == "lrkd" and v.extractor == d.default_extractor and v.mode == d.default_mode]
        runs += train_variants(cfg, run_dir, default, teacher=other)
    agg = aggregate(runs, [lab.name for lab in cfg.labels])
    out = run_dir / "student"
    rows = []
    for name, s in agg.items():
        v = next(r for r in runs if r["variant"] == name)
        parts = name.split("-")
        lam = next((float(p[3:]) for p in parts if p.startswith("lam")), d.lam if parts[0] == "lrkd" else 0.0)
        teacher = "" if name == "vanilla" or (parts[0] == "lrkd" and lam == 0) else other if other and name.endswith(_teacher_tag(cfg, other)) else d.teacher
        rows.append({"variant": name, "extractor": parts[1] if parts[0] == "lrkd" else parts[0], "mode": parts[2] if parts[0] == "lrkd" else "",
                     "lambda": lam, "teacher": teacher, "seeds": len(s["seeds"]), "accuracy_mean": s["accuracy"]["mean"], "accuracy_std": s["accuracy"]["std"],
                     "macro_f1_mean": s["macro_f1"]["mean"], "macro_f1_std": s["macro_f1"]["std"],
                     "extractor_params": v["metrics"].get("extractor_params", 0)})
    with open(out / "ablation.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "ablation.md").write_text(metrics_table(agg) + "\n")
    _plot(rows, out / "ablation.png")
    log(f"ablation: {len(rows)} variants -> {out / 'ablation.csv'}, ablation.md, ablation.png")
    return out / "ablation.csv"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    main_teacher = next(r["teacher"] for r in rows if r["mode"] and r["lambda"] > 0)
    for (ext, mode) in sorted({(r["extractor"], r["mode"]) for r in rows if r["mode"]}):
        pts = sorted((r["lambda"], r["macro_f1_mean"], r["macro_f1_std"]) for r in rows
                     if r["extractor"] == ext and r["mode"] == mode and r["teacher"] in (main_teacher, ""))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=2, label=f"{ext}/{mode}")
    for r in rows:
        if r["mode"] and r["teacher"] not in (main_teacher, ""):
            ax.errorbar([r["lambda"]], [r["macro_f1_mean"]], yerr=[r["macro_f1_std"]], marker="*", ms=10, capsize=2, ls="none",
                        label=f"{r['extractor']}/{r['mode']}, {r['teacher']} teacher")
    for r in rows:
        if not r["mode"]:
            ax.axhline(r["macro_f1_mean"], ls="--", lw=1, color="gray")
            ax.text(0, r["macro_f1_mean"], r["variant"], fontsize=7, va="bottom")
    ax.set_xlabel("lambda (latent loss weight)")
    ax.set_ylabel("test macro-F1 (mean +- std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metrics_table(agg: dict) -> str:
    labels = list(next(iter(agg.values()))["per_class_f1"])
    head = "| variant | accuracy | macro-F1 | " + " | ".join(f"F1 {lab}" for lab in labels) + " |"
    lines = [head, "|" + "---|" * (3 + len(labels))]
    for name, s in agg.items():
        cells = " | ".join(f"{s['per_class_f1'][lab]['mean']:.3f}" for lab in labels)
        lines.append(f"| {name} | {s['accuracy']['mean']:.3f} ± {s['accuracy']['std']:.3f} | "
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
