"""The stages of a run, each reading and writing under RUN_DIR and skipping itself when its manifest matches."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mpcot.generate import (
    JudgeSpec,
    consistency_filter,
    expand_tasks,
    generation_stats,
    run_generation,
    write_parquet_atomic,
)
from workflows.artifacts import fingerprint, is_fresh, read_manifest, write_json_atomic, write_manifest
from workflows.config import RunConfig
from workflows.data import load_pairs, split_by_query
from workflows.models import resolve_model
from workflows.runtime import ensure_ray

SPLITS = ("train", "val", "test")


def log(msg: str) -> None:
    print(f"[thinkbroad] {msg}", flush=True)


def run_dir_for(cfg: RunConfig, override: str | None) -> Path:
    return Path(override or cfg.run_dir or f"runs/{cfg.name}")


def prepare(cfg: RunConfig, run_dir: Path) -> dict[str, Path]:
    """Load + validate the labelled pairs, split by query, write RUN_DIR/data/{train,val,test}.parquet."""
    out = run_dir / "data"
    paths = {s: out / f"{s}.parquet" for s in SPLITS}
    src = Path(cfg.data.path)
    inputs = {str(src): fingerprint(src)} if src.exists() else {}
    key = cfg.section_hash("data", "labels")
    if inputs and is_fresh(out, key, inputs):
        log(f"prepare: up to date ({out})")
        return paths
    t0 = time.time()
    pairs = load_pairs(src, cfg.data.format, cfg.data.columns, [lab.name for lab in cfg.labels])
    splits = split_by_query(pairs, cfg.data.split)
    for name, table in splits.items():
        write_parquet_atomic(table, paths[name])
    counts = {name: t.num_rows for name, t in splits.items()}
    queries = {name: len(set(t.column("query_id").to_pylist())) for name, t in splits.items()}
    write_manifest(out, "prepare", key, inputs, t0, rows=counts, queries=queries)
    log(f"prepare: {pairs.num_rows} pairs -> " + ", ".join(f"{k} {v} ({queries[k]} queries)" for k, v in counts.items()))
    return paths


def generation_tasks(cfg: RunConfig, split_paths: dict[str, Path]) -> pa.Table:
    tables = []
    for split in cfg.generation.splits:
        pairs = pq.read_table(split_paths[split])
        if cfg.generation.max_pairs is not None:
            pairs = pairs.slice(0, cfg.generation.max_pairs)
        tables.append(expand_tasks(pairs, cfg.perspectives, cfg.generation.samples_per_prompt, split))
    return pa.concat_tables(tables)


def generate(cfg: RunConfig, run_dir: Path, progress: bool = True) -> Path:
    """MPCoT generation + consistency filter + stats -> RUN_DIR/mpcot/{rationales,sft}.parquet, stats.json."""
    split_paths = prepare(cfg, run_dir)
    out = run_dir / "mpcot"
    key = cfg.section_hash("teacher", "generation", "labels", "perspectives", "data")
    inputs = {s: fingerprint(split_paths[s]) for s in cfg.generation.splits}
    if is_fresh(out, key, inputs):
        log(f"generate: up to date ({out})")
        return out
    _discard_stale_parts(out, key)
    t0 = time.time()
    tasks = generation_tasks(cfg, split_paths)
    model_path = resolve_model(cfg.teacher.model)
    spec = JudgeSpec(
        model_path=model_path,
        model_name=cfg.teacher.model,
        labels=[lab.model_dump() for lab in cfg.labels],
        perspectives=[p.model_dump() for p in cfg.perspectives],
        gen=cfg.generation.model_dump(),
        engine_kwargs=dict(cfg.generation.engine),
        chat_template=cfg.teacher.chat_template,
        chat_template_kwargs=dict(cfg.teacher.chat_template_kwargs),
    )
    log(f"generate: {tasks.num_rows} judgements ({len(cfg.perspectives)} perspectives) with {cfg.teacher.model}")
    ensure_ray()
    result = run_generation(tasks, out, spec, cfg.generation, progress=progress)
    rationales = pq.read_table(result.rationales_path)
    sft = consistency_filter(rationales)
    write_parquet_atomic(sft, out / "sft.parquet")
    stats = generation_stats(rationales, [p.name for p in cfg.perspectives], [lab.name for lab in cfg.labels])
    stats["throughput"] = {
        "generated_now": result.generated_now,
        "reused_from_earlier_attempt": result.reused,
        "seconds": round(result.seconds, 2),
        "completion_tokens_per_s": round(result.completion_tokens_now / max(result.seconds, 1e-9), 1),
    }
    write_json_atomic(stats, out / "stats.json")
    write_manifest(out, "generate", key, inputs, t0, rows=result.rows, sft_rows=sft.num_rows,
                   generated_now=result.generated_now, reused=result.reused, model_path=model_path)
    shutil.rmtree(out / "parts", ignore_errors=True)
    o = stats["overall"]
    log(f"generate: {result.rows} rows ({result.generated_now} new, {result.reused} resumed), parse rate "
        f"{o['parse_rate']:.1%}, accuracy {o['accuracy']:.1%}, {sft.num_rows} SFT rows -> {out}")
    return out


def _discard_stale_parts(out: Path, key: str) -> None:
    """Parts of an interrupted attempt are reused only if they were made with the same config."""
    parts, marker = out / "parts", out / "parts" / "_config_hash"
    if parts.exists() and (not marker.exists() or marker.read_text().strip() != key):
        n = len(list(parts.glob("part-*.parquet")))
        log(f"generate: the config changed since the interrupted attempt; discarding its {n} part file(s)")
        shutil.rmtree(parts)
    manifest = read_manifest(out)
    if manifest is not None:
        (out / "manifest.json").unlink()
    parts.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)


def summary(stats_path: Path) -> str:
    stats = json.loads(Path(stats_path).read_text())
    lines = ["perspective            parse    accuracy"]
    for name, s in stats["per_perspective"].items():
        lines.append(f"{name:<22} {s['parse_rate']:>6.1%}   {s['accuracy']:>6.1%}")
    return "\n".join(lines)
