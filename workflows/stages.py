"""The stages of a run, each reading and writing under RUN_DIR and skipping itself when its manifest matches."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from mpcot.config import GenerationConfig
from mpcot.generate import run_generation
from mpcot.judge import JudgeSpec
from mpcot.rationales import consistency_filter, generation_stats
from mpcot.tasks import PairSource, TaskPlan
from workflows.artifacts import fingerprint, invalidate, is_fresh, start_attempt, write_json_atomic, write_manifest
from workflows.config import RunConfig
from pairs.errors import DataError
from pairs.joins import JOINED_NOUN
from pairs.scan import scan_pairs
from pairs.splits import SPLITS, split_codes, split_summary
from pairs.write import input_files, write_splits
from workflows.models import resolve_model
from hardware.runtime import ensure_ray



def log(msg: str) -> None:
    print(f"[thinkbroad] {msg}", flush=True)


def run_dir_for(cfg: RunConfig, override: str | None) -> Path:
    return Path(override or cfg.run_dir or f"runs/{cfg.name}")


def prepare(cfg: RunConfig, run_dir: Path) -> dict[str, Path]:
    """Read + validate the labelled pairs (joined and filtered as configured), split by query, write
    RUN_DIR/data/{train,val,test}.parquet. Streams: memory is bounded by the batch, not by the input."""
    out = run_dir / "data"
    paths = {s: out / f"{s}.parquet" for s in SPLITS}
    files = input_files(cfg.data)
    src = files[0]
    inputs = {str(f): fingerprint(f) for f in files if f.exists()}
    key = cfg.section_hash("data", "labels")
    if len(inputs) == len(files) and is_fresh(out, key, inputs):
        log(f"prepare: up to date ({out})")
        return paths
    t0 = time.time()
    codes_of_labels = [lab.name for lab in cfg.labels]
    with tempfile.TemporaryDirectory(prefix="thinkbroad-prepare-") as work:
        scan = scan_pairs(cfg.data, codes_of_labels, Path(work))
        codes = split_codes(scan.index, cfg.data.split, src)
        counts, queries, support = split_summary(scan.index, codes, codes_of_labels)
        empty = [name for name in SPLITS if not counts[name]]
        if empty:
            frac = cfg.data.split
            raise DataError(
                f"{src}: data.split (train {frac.train:g}, val {frac.val:g}, test {frac.test:g}) leaves {' and '.join(empty)} "
                "empty (" + ", ".join(f"{k} {counts[k]} pairs in {queries[k]} queries" for k in SPLITS) + "); later stages "
                "need all three (train: generation and training, val: early stopping, test: teacher eval and student "
                "metrics): give each split a fraction above 0, e.g. 0.8/0.1/0.1, and use data with at least 3 queries"
            )
        invalidate(out)  # from here on the old splits are being replaced: never "up to date" until the manifest is back
        write_splits(scan, codes, paths)
    present = {c for s in support.values() for c, n in s.items() if n}
    warnings = [f"label {c} has no pair in the {name} split ({sum(s[c] for s in support.values())} in the data); "
                f"{'early stopping and model selection' if name == 'val' else 'test metrics'} cannot see it"
                for name in ("val", "test") for c in sorted(present) if not support[name][c]]
    read = {"rows_read": scan.rows_read, "filtered_out": scan.filtered_out, "missing_dropped": scan.missing_dropped,
            "joined_duplicate_keys": scan.joined_duplicates,
            "test_split": f"{cfg.data.split.column} == {cfg.data.split.test_value!r}" if cfg.data.split.column else "by query"}
    write_manifest(out, "prepare", key, inputs, t0, rows=counts, queries=queries, label_support=support, warnings=warnings,
                   input_rows=read)
    total = scan.index.num_rows
    dropped = "".join(f", {n} without a {JOINED_NOUN[name]} dropped" for name, n in scan.missing_dropped.items())
    filtered = f" ({scan.filtered_out} of {scan.rows_read} rows filtered out{dropped})" if scan.filtered_out or dropped else ""
    log(f"prepare: {total} pairs{filtered} -> " + ", ".join(f"{k} {v} ({queries[k]} queries)" for k, v in counts.items()))
    for name, s in support.items():
        log(f"prepare: {name} labels " + " ".join(f"{c}={n}" for c, n in s.items()))
    for w in warnings:
        log(f"prepare: WARNING: {w}")
    return paths


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
        log(f"generate: up to date ({out})")
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
