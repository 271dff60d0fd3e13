"""`thinkbroad generate`: MPCoT generation (the teacher LLM judges each pair from every perspective, vLLM actors on
Ray Data), the consistency filter and the statistics -> RUN_DIR/mpcot/. `judge_spec` is the judge every stage that
runs the teacher (DPO resampling, teacher evaluation, the distillation targets) builds from the config."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from hardware.runtime import ensure_ray
from mpcot.config import GenerationConfig
from mpcot.generate import run_generation
from mpcot.judge import JudgeSpec
from mpcot.rationales import consistency_filter, generation_stats
from mpcot.tasks import PairSource, TaskPlan
from workflows.artifacts import fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic, write_manifest
from workflows.config import RunConfig
from workflows.models import resolve_model
from workflows.stages.common import log, log_up_to_date
from workflows.stages.prepare import prepare


def generation_tasks(cfg: RunConfig, split_paths: dict[str, Path]) -> TaskPlan:
    """The generation splits' pairs (the first `max_pairs` of each) x perspectives x samples, streamed from Parquet."""
    g = cfg.generation
    return TaskPlan(tuple(PairSource(split, str(split_paths[split]), g.max_pairs) for split in g.splits),
                    tuple(p.name for p in cfg.perspectives), g.samples_per_prompt)


def judge_spec(cfg: RunConfig, model_path: str, model_name: str, perspectives, gen: GenerationConfig) -> JudgeSpec:
    return JudgeSpec(
        model_path=model_path,
        model_name=model_name,
        labels=[lab.model_dump() for lab in cfg.labels],
        perspectives=[p.model_dump() for p in perspectives],
        gen=gen.model_dump(),
        engine_kwargs=dict(gen.engine),
        chat_template=cfg.teacher.chat_template,
        chat_template_kwargs=dict(cfg.teacher.chat_template_kwargs),
    )


def generate(cfg: RunConfig, run_dir: Path, progress: bool = True) -> Path:
    """MPCoT generation + consistency filter + stats -> RUN_DIR/mpcot/{rationales,sft}.parquet, stats.json."""
    split_paths = prepare(cfg, run_dir)
    out = run_dir / "mpcot"
    key = cfg.section_hash("teacher", "generation", "labels", "perspectives", "data")
    inputs = {s: fingerprint(split_paths[s]) for s in cfg.generation.splits}
    if is_fresh(out, key, inputs):
        log_up_to_date("generate", out)
        return out
    invalidate(out)
    start_attempt(out / "parts", key, "generate", inputs)
    t0 = time.time()
    tasks = generation_tasks(cfg, split_paths)
    model_path = resolve_model(cfg.teacher.model)
    spec = judge_spec(cfg, model_path, cfg.teacher.model, cfg.perspectives, cfg.generation)
    log(f"generate: {tasks.num_tasks()} judgements ({len(cfg.perspectives)} perspectives) with {cfg.teacher.model}")
    ensure_ray()
    result = run_generation(tasks, out, spec, cfg.generation, progress=progress)
    sft_rows = consistency_filter(result.rationales_path, out / "sft.parquet", cfg.perspectives, cfg.labels, cfg.generation)
    stats = generation_stats(result.rationales_path, [p.name for p in cfg.perspectives], [lab.name for lab in cfg.labels])
    stats["throughput"] = {
        "generated_now": result.generated_now,
        "reused_from_earlier_attempt": result.reused,
        "seconds": round(result.seconds, 2),
        "completion_tokens_per_s": round(result.completion_tokens_now / max(result.seconds, 1e-9), 1),
    }
    write_json_atomic(stats, out / "stats.json")
    write_manifest(out, "generate", key, inputs, t0, rows=result.rows, sft_rows=sft_rows,
                   generated_now=result.generated_now, reused=result.reused, model_path=model_path)
    shutil.rmtree(out / "parts", ignore_errors=True)
    o = stats["overall"]
    log(f"generate: {result.rows} rows ({result.generated_now} new, {result.reused} resumed), parse rate "
        f"{o['parse_rate']:.1%}, accuracy {o['accuracy']:.1%}, {sft_rows} SFT rows -> {out}")
    return out


def summary(stats_path: Path) -> str:
    stats = json.loads(Path(stats_path).read_text())
    lines = ["perspective            parse    accuracy"]
    for name, s in stats["per_perspective"].items():
        lines.append(f"{name:<22} {s['parse_rate']:>6.1%}   {s['accuracy']:>6.1%}")
    return "\n".join(lines)
