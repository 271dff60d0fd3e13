"""`thinkbroad sft`, `dpo` and `teacher-eval`, the teacher stages: SFT on consistency-filtered rationales, DPO on
conflict samples (mined here, resampled pass@k with the SFT model), and base/SFT/DPO evaluation."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mpcot.conflicts import (
    count_rows,
    mine_pair,
    new_counts,
    preference_problems,
    raise_preference_problems,
    rescue_pair,
)
from mpcot.generate import GenerationJob, run_generation, run_generations
from mpcot.judge import task_messages
from mpcot.rationales import MESSAGES
from mpcot.tasks import PAIR_COLUMNS, PairSource, TaskPlan
from pairs.parquet import RowBuffer, atomic_parquet_writer, pair_groups, read_batches, write_parquet_atomic
from mpcot.perspectives import NEUTRAL_PERSPECTIVE
from teacher.data import balance_by_label
from teacher.evaluate import score_judgements
from teacher.train import TrainJob, train_teacher
from workflows.artifacts import fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic, write_manifest
from workflows.config import RunConfig
from workflows.models import resolve_model
from hardware.runtime import ensure_ray
from workflows.stages.common import log, log_up_to_date
from workflows.stages.generate import generate, judge_spec
from workflows.stages.prepare import prepare


def _losses(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


def sft(cfg: RunConfig, run_dir: Path) -> Path:
    """RUN_DIR/teacher/sft/model: the base LLM fine-tuned on the pooled, consistency-filtered rationales."""
    gen_dir = generate(cfg, run_dir)
    out = run_dir / "teacher" / "sft"
    key = cfg.section_hash("teacher", "sft")
    inputs = {"sft_rows": fingerprint(gen_dir / "sft.parquet")}
    if is_fresh(out, key, inputs):
        log_up_to_date("sft", out)
        return out / "model"
    invalidate(out)
    start_attempt(out / "ray", key, "sft", inputs)
    t0 = time.time()
    labels = pq.read_table(gen_dir / "sft.parquet", columns=["label"]).column("label").to_pylist()
    if not labels:
        raise RuntimeError(
            f"{gen_dir / 'sft.parquet'} is empty: no rationale matched its gold label. Generate more pairs "
            "(generation.max_pairs) or more samples (generation.samples_per_prompt)"
        )
    rows, counts = balance_by_label(labels, cfg.sft.balance, cfg.sft.cap_per_label, cfg.sft.seed)
    dataset = out / "train.parquet"
    conversations = pq.read_table(gen_dir / "sft.parquet", columns=["prompt", "completion"])
    write_parquet_atomic(conversations.take(pa.array(rows, pa.int64())), dataset)
    log(f"sft: {len(rows)} rows (labels before balancing {counts['before']}, after {counts['after']})")
    ensure_ray()
    result = train_teacher(TrainJob("sft", str(dataset), resolve_model(cfg.teacher.model), str(out), cfg.sft.model_dump()))
    losses = _losses(result.log_history, "loss")
    write_manifest(out, "sft", key, inputs, t0, rows=len(rows), label_counts=counts, steps=result.steps,
                   first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    log(f"sft: {result.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; model -> {result.model_dir}")
    return Path(result.model_dir)


_PREFERENCE_SCHEMA = pa.schema([("pair_id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES),
                                ("rejected", MESSAGES), ("chosen_perspective", pa.string()),
                                ("rejected_perspective", pa.string()), ("source", pa.string())])
_PAIR_SCHEMA = pa.schema([(name, pa.string()) for name in PAIR_COLUMNS])
_MINING_COLUMNS = ["pair_id", "query_id", "perspective", "sample_idx", "parse_ok", "correct", "completion", "query",
                   "title", "attributes", "gold_label"]


class _PreferenceTable:
    """Preference rows into a Parquet writer as they are mined, each with its pair's perspective-neutral prompt,
    checked on the way (`preference_problems`); `close` raises what was found."""

    def __init__(self, cfg: RunConfig, writer, where: str, counts: dict):
        self.cfg, self.where, self.counts = cfg, where, counts
        self.out = RowBuffer(writer, _PREFERENCE_SCHEMA)
        self.rows = self.n_errors = 0
        self.errors: list[str] = []

    def add(self, pair: dict, found: list[dict]) -> None:
        if not found:
            return
        g = self.cfg.generation
        prompt = task_messages(pair, NEUTRAL_PERSPECTIVE, self.cfg.labels, g)
        errors = preference_problems([{**r, "prompt": prompt} for r in found], self.where, start=self.rows)
        self.n_errors += len(errors)
        self.errors += errors[: max(0, 20 - len(self.errors))]
        self.out.add([{
            "pair_id": r["pair_id"],
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "chosen_perspective": r["chosen_perspective"],
            "rejected_perspective": r["rejected_perspective"],
            "source": r["source"],
        } for r in found])
        self.rows += len(found)
        count_rows(self.counts, found)

    def close(self) -> None:
        self.out.flush()
        raise_preference_problems(self.errors, self.n_errors, self.rows, self.where)


def _needing_resample(rationales: Path):
    """The pairs no perspective got right, with their wrong rationales, in rationale order (the order of the
    resampling tasks, so the resampled rows come in it too)."""
    scratch = new_counts()
    for rows in pair_groups(rationales, _MINING_COLUMNS):
        _, wrong = mine_pair(rows[0]["pair_id"], rows, scratch)
        if wrong is not None:
            yield rows, wrong


def preferences(cfg: RunConfig, run_dir: Path, sft_model: Path, inputs: dict[str, str] | None = None) -> tuple[Path, dict]:
    """Mine conflict samples into RUN_DIR/teacher/dpo/preferences.parquet (pass@k resampling with the SFT model),
    streaming over the rationales pair by pair: the driver holds one pair's rows and one batch of output rows.
    `inputs`: the DPO stage's input fingerprints (SFT model, rationales): resampled parts of others are discarded."""
    rationales = run_dir / "mpcot" / "rationales.parquet"
    out = run_dir / "teacher" / "dpo"
    path = out / "preferences.parquet"
    need_path = out / "resample" / "pairs.parquet"
    counts = new_counts()
    k = cfg.dpo.pass_k
    with atomic_parquet_writer(path, _PREFERENCE_SCHEMA) as writer:
        table = _PreferenceTable(cfg, writer, str(path), counts)
        with atomic_parquet_writer(need_path, _PAIR_SCHEMA) as need_writer:
            need = RowBuffer(need_writer, _PAIR_SCHEMA)
            for rows in pair_groups(rationales, _MINING_COLUMNS):
                found, wrong = mine_pair(rows[0]["pair_id"], rows, counts)
                table.add(rows[0], found)
                if wrong is not None:
                    need.add([{**{c: rows[0][c] for c in PAIR_COLUMNS if c != "label"}, "label": rows[0]["gold_label"]}])
            need.flush()
        if counts["need_resample"] and k > 0:
            gen = cfg.generation.model_copy(update={"temperature": cfg.dpo.resample_temperature, "samples_per_prompt": k})
            log(f"dpo: {counts['need_resample']} conflict pairs with no correct rationale; resampling each up to {k} times")
            ensure_ray()
            spec = judge_spec(cfg, str(sft_model), "sft", [NEUTRAL_PERSPECTIVE], gen)
            start_attempt(out / "resample" / "parts", cfg.section_hash("teacher", "generation", "sft", "dpo"), "dpo resample",
                          inputs)
            plan = TaskPlan((PairSource("resample", str(need_path)),), (NEUTRAL_PERSPECTIVE.name,), k)
            result = run_generation(plan, out / "resample", spec, gen)
            tried = pair_groups(result.rationales_path, ["pair_id", "perspective", "sample_idx", "parse_ok", "correct", "completion"])
            for (rows, wrong), tries in zip(_needing_resample(rationales), tried, strict=True):
                table.add(rows[0], rescue_pair(rows[0]["pair_id"], wrong, tries, k, counts))
        else:
            counts["skipped_no_correct"] = counts["need_resample"]
        table.close()
    return path, counts


def dpo(cfg: RunConfig, run_dir: Path) -> Path:
    """RUN_DIR/teacher/dpo/model: the SFT model after DPO on conflict samples."""
    sft_model = sft(cfg, run_dir)
    out = run_dir / "teacher" / "dpo"
    key = cfg.section_hash("teacher", "generation", "sft", "dpo", "labels", "perspectives")
    inputs = {"sft_model": fingerprint(sft_model), "rationales": fingerprint(run_dir / "mpcot" / "rationales.parquet")}
    if is_fresh(out, key, inputs):
        log_up_to_date("dpo", out)
        return out / "model"
    invalidate(out)
    t0 = time.time()
    path, counts = preferences(cfg, run_dir, sft_model, inputs)
    log(f"dpo: {counts['preference_rows']} preference rows from {counts['conflict_pairs']} conflict pairs "
        f"({counts['cross_perspective_rows']} cross-perspective, {counts['rescued_by_resampling']} rescued by pass@{cfg.dpo.pass_k}, "
        f"{counts['skipped_no_correct']} skipped)")
    start_attempt(out / "ray", key, "dpo", inputs)
    ensure_ray()
    result = train_teacher(TrainJob("dpo", str(path), str(sft_model), str(out), cfg.dpo.model_dump()))
    margins = _losses(result.log_history, "rewards/margins")
    write_manifest(out, "dpo", key, inputs, t0, counts=counts, steps=result.steps,
                   first_margin=margins[0] if margins else None, last_margin=margins[-1] if margins else None)
    shutil.rmtree(out / "resample" / "parts", ignore_errors=True)
    log(f"dpo: {result.steps} steps, reward margin {margins[0]:.3f} -> {margins[-1]:.3f}; model -> {result.model_dir}")
    return Path(result.model_dir)


def teacher_eval(cfg: RunConfig, run_dir: Path) -> Path:
    """Base vs SFT vs SFT+DPO on the test split, per perspective and perspective-neutral -> teacher/eval.json."""
    dpo_model = dpo(cfg, run_dir)
    sft_model = run_dir / "teacher" / "sft" / "model"
    out = run_dir / "teacher" / "eval"
    split_path = prepare(cfg, run_dir)[cfg.teacher_eval.split]
    models = {"base": resolve_model(cfg.teacher.model), "sft": str(sft_model), "dpo": str(dpo_model)}
    key = cfg.section_hash("teacher", "generation", "sft", "dpo", "teacher_eval", "labels", "perspectives")
    inputs = {tag: fingerprint(path) for tag, path in models.items() if tag != "base"} | {"split": fingerprint(split_path)}
    result_path = run_dir / "teacher" / "eval.json"
    if is_fresh(out, key, inputs) and result_path.exists():
        log_up_to_date("teacher eval", result_path)
        return result_path
    invalidate(out)
    t0 = time.time()
    perspectives = list(cfg.perspectives) + [NEUTRAL_PERSPECTIVE]
    source = PairSource(cfg.teacher_eval.split, str(split_path), cfg.teacher_eval.max_pairs or None)
    tasks = TaskPlan((source,), tuple(p.name for p in perspectives), 1)
    n_pairs = tasks.pair_counts()[0]
    gen = cfg.generation.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    ensure_ray()
    report = {"split": cfg.teacher_eval.split, "pairs": n_pairs, "models": {}}
    codes = [lab.name for lab in cfg.labels]
    log(f"teacher eval: {', '.join(models)} on {n_pairs} {cfg.teacher_eval.split} pairs x {len(perspectives)} prompts")
    for tag in models:
        start_attempt(out / tag / "parts", key + tag, f"teacher eval ({tag})", inputs)
    # one pool of engine actors for the three models where an actor can switch models (CPU), else one pool each
    results = run_generations([GenerationJob(tasks, out / tag, judge_spec(cfg, path, tag, perspectives, gen))
                               for tag, path in models.items()], gen)
    for tag, res in zip(models, results):
        judged = read_batches(res.rationales_path, ["perspective", "gold_label", "predicted_label"])
        report["models"][tag] = score_judgements((r for batch in judged for r in batch.to_pylist()), codes)
    write_json_atomic(report, result_path)
    write_manifest(out, "teacher_eval", key, inputs, t0, pairs=n_pairs)
    for tag in models:
        shutil.rmtree(out / tag / "parts", ignore_errors=True)
    log("teacher eval:\n" + eval_table(report))
    return result_path


def eval_table(report: dict) -> str:
    models = report["models"]
    names = list(next(iter(models.values())))
    lines = ["prompt".ljust(22) + "".join(f"{tag:>18}" for tag in models)]
    for name in names:
        cells = "".join(f"{models[tag][name]['accuracy']:>8.1%} / {models[tag][name]['macro_f1']:.2f}" for tag in models)
        lines.append(name.ljust(22) + cells)
    return "accuracy / macro-F1\n" + "\n".join(lines)
