"""Teacher stages: SFT on consistency-filtered rationales, DPO on conflict samples, and base/SFT/DPO evaluation."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mpcot.conflicts import add_resampled, mine_conflict_pairs, validate_preferences
from mpcot.generate import expand_tasks, run_generation, write_parquet_atomic
from mpcot.perspectives import NEUTRAL_PERSPECTIVE
from mpcot.prompts import build_messages
from teacher.data import balance_by_label
from teacher.evaluate import score_judgements
from teacher.train import TrainJob, train_teacher
from workflows.artifacts import fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic, write_manifest
from workflows.config import RunConfig
from workflows.models import resolve_model
from workflows.runtime import ensure_ray
from workflows.stages import generate, judge_spec, log, prepare

_MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _losses(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


def sft(cfg: RunConfig, run_dir: Path) -> Path:
    """RUN_DIR/teacher/sft/model: the base LLM fine-tuned on the pooled, consistency-filtered rationales."""
    gen_dir = generate(cfg, run_dir)
    out = run_dir / "teacher" / "sft"
    key = cfg.section_hash("teacher", "sft")
    inputs = {"sft_rows": fingerprint(gen_dir / "sft.parquet")}
    if is_fresh(out, key, inputs):
        log(f"sft: up to date ({out})")
        return out / "model"
    invalidate(out)
    start_attempt(out / "ray", key, "sft")
    t0 = time.time()
    rows = pq.read_table(gen_dir / "sft.parquet").to_pylist()
    if not rows:
        raise RuntimeError(
            f"{gen_dir / 'sft.parquet'} is empty: no rationale matched its gold label. Generate more pairs "
            "(generation.max_pairs) or more samples (generation.samples_per_prompt)"
        )
    rows, counts = balance_by_label(rows, cfg.sft.balance, cfg.sft.cap_per_label, cfg.sft.seed)
    dataset = out / "train.parquet"
    write_parquet_atomic(pa.Table.from_pylist(
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows],
        schema=pa.schema([("prompt", _MSG), ("completion", _MSG)])), dataset)
    log(f"sft: {len(rows)} rows (labels before balancing {counts['before']}, after {counts['after']})")
    ensure_ray()
    result = train_teacher(TrainJob("sft", str(dataset), resolve_model(cfg.teacher.model), str(out), cfg.sft.model_dump()))
    losses = _losses(result.log_history, "loss")
    write_manifest(out, "sft", key, inputs, t0, rows=len(rows), label_counts=counts, steps=result.steps,
                   first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    log(f"sft: {result.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; model -> {result.model_dir}")
    return Path(result.model_dir)


def _pairs_by_id(cfg: RunConfig, run_dir: Path) -> dict[str, dict]:
    paths = prepare(cfg, run_dir)
    out = {}
    for split in cfg.generation.splits:
        for p in pq.read_table(paths[split]).to_pylist():
            out[p["pair_id"]] = p
    return out


def _neutral_prompt(cfg: RunConfig, pair: dict) -> list[dict]:
    shown = {"query": pair["query"], "title": pair["title"], "attributes": json.loads(pair["attributes"] or "{}")}
    g = cfg.generation
    return build_messages(shown, NEUTRAL_PERSPECTIVE, cfg.labels, g.output_mode, g.rationale_max_chars, g.max_attribute_chars)


def preferences(cfg: RunConfig, run_dir: Path, sft_model: Path) -> tuple[Path, dict]:
    """Mine conflict samples into RUN_DIR/teacher/dpo/preferences.parquet (pass@k resampling with the SFT model)."""
    gen_dir = run_dir / "mpcot"
    out = run_dir / "teacher" / "dpo"
    mining = mine_conflict_pairs(pq.read_table(gen_dir / "rationales.parquet").to_pylist())
    pairs = _pairs_by_id(cfg, run_dir)
    resampled: list[dict] = []
    k = cfg.dpo.pass_k
    if mining.need_resample and k > 0:
        need = pa.Table.from_pylist([pairs[pid] for pid in mining.need_resample])
        tasks = expand_tasks(need, [NEUTRAL_PERSPECTIVE], k, "resample")
        gen = cfg.generation.model_copy(update={"temperature": cfg.dpo.resample_temperature, "samples_per_prompt": k})
        log(f"dpo: {len(mining.need_resample)} conflict pairs with no correct rationale; resampling each up to {k} times")
        ensure_ray()
        spec = judge_spec(cfg, str(sft_model), "sft", [NEUTRAL_PERSPECTIVE], gen)
        start_attempt(out / "resample" / "parts", cfg.section_hash("teacher", "generation", "sft", "dpo"), "dpo resample")
        result = run_generation(tasks, out / "resample", spec, gen)
        resampled = pq.read_table(result.rationales_path).to_pylist()
    mined = add_resampled(mining, resampled, k)
    rows = [
        {
            "pair_id": r["pair_id"],
            "prompt": _neutral_prompt(cfg, pairs[r["pair_id"]]),
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "chosen_perspective": r["chosen_perspective"],
            "rejected_perspective": r["rejected_perspective"],
            "source": r["source"],
        }
        for r in mined.rows
    ]
    validate_preferences([{**r, "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]} for r in rows],
                         where=str(out / "preferences.parquet"))
    schema = pa.schema([("pair_id", pa.string()), ("prompt", _MSG), ("chosen", _MSG), ("rejected", _MSG),
                        ("chosen_perspective", pa.string()), ("rejected_perspective", pa.string()), ("source", pa.string())])
    path = out / "preferences.parquet"
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), path)
    return path, mined.counts


def dpo(cfg: RunConfig, run_dir: Path) -> Path:
    """RUN_DIR/teacher/dpo/model: the SFT model after DPO on conflict samples."""
    sft_model = sft(cfg, run_dir)
    out = run_dir / "teacher" / "dpo"
    key = cfg.section_hash("teacher", "generation", "sft", "dpo", "labels", "perspectives")
    inputs = {"sft_model": fingerprint(sft_model), "rationales": fingerprint(run_dir / "mpcot" / "rationales.parquet")}
    if is_fresh(out, key, inputs):
        log(f"dpo: up to date ({out})")
        return out / "model"
    invalidate(out)
    t0 = time.time()
    path, counts = preferences(cfg, run_dir, sft_model)
    log(f"dpo: {counts['preference_rows']} preference rows from {counts['conflict_pairs']} conflict pairs "
        f"({counts['cross_perspective_rows']} cross-perspective, {counts['rescued_by_resampling']} rescued by pass@{cfg.dpo.pass_k}, "
        f"{counts['skipped_no_correct']} skipped)")
    start_attempt(out / "ray", key, "dpo")
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
        log(f"teacher eval: up to date ({result_path})")
        return result_path
    invalidate(out)
    t0 = time.time()
    pairs = pq.read_table(split_path)
    if cfg.teacher_eval.max_pairs:
        pairs = pairs.slice(0, cfg.teacher_eval.max_pairs)
    perspectives = list(cfg.perspectives) + [NEUTRAL_PERSPECTIVE]
    tasks = expand_tasks(pairs, perspectives, 1, cfg.teacher_eval.split)
    gen = cfg.generation.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    ensure_ray()
    report = {"split": cfg.teacher_eval.split, "pairs": pairs.num_rows, "models": {}}
    codes = [lab.name for lab in cfg.labels]
    for tag, path in models.items():
        log(f"teacher eval: {tag} on {pairs.num_rows} {cfg.teacher_eval.split} pairs x {len(perspectives)} prompts")
        start_attempt(out / tag / "parts", key + tag, f"teacher eval ({tag})")
        res = run_generation(tasks, out / tag, judge_spec(cfg, path, tag, perspectives, gen), gen)
        report["models"][tag] = score_judgements(pq.read_table(res.rationales_path).to_pylist(), codes)
    write_json_atomic(report, result_path)
    write_manifest(out, "teacher_eval", key, inputs, t0, pairs=pairs.num_rows)
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
