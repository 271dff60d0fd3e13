"""The MPCoT generation stage: Ray Data expands pairs x perspectives x samples, a pool of actors holding
`vllm.LLM` judges them, and the driver writes each finished batch as an atomic Parquet part.

Resume: a rerun reads the finished parts, skips their task ids and generates only the rest, so a run killed
midway ends with exactly one row per (pair, perspective, sample). Parts are consolidated into one table at the end.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from mpcot.labels import Label
from mpcot.parsing import ParsedJudgement, normalise_label, parse_output
from mpcot.perspectives import Perspective
from mpcot.placement import engine_placement
from mpcot.prompts import build_messages, format_completion, json_regex, render_prompt


class GenerationConfig(BaseModel):
    """Everything about how the teacher is sampled. Lives in the `generation:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    # json: {"rationale", "label"} constrained by vLLM structured outputs, the label one of the label titles
    # choice: free rationale text, then a guided choice among the label titles after "Label: "
    # free_text: unconstrained; the label is parsed from a final "Label: X" line
    output_mode: Literal["json", "choice", "free_text"] = "json"
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])
    max_pairs: int | None = Field(None, ge=1, description="first N pairs of each split, null = all")
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, description="json mode: leave room for rationale_max_chars, or long answers are cut and fail to parse")
    repetition_penalty: float = Field(1.0, gt=0.0, description=">1 discourages the loops small greedy models fall into")
    rationale_max_chars: int = Field(400, ge=1, description="json mode: longest rationale allowed")
    max_attribute_chars: int = Field(300, ge=0, description="attribute text is cut to this length in prompts")
    batch_size: int = Field(32, ge=1, description="prompts per vLLM call; one Parquet part per batch")
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas (Ray actors)")
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    cpus_per_engine: int | None = Field(None, ge=1, description="CPU mode; null = the cluster's CPUs / concurrency")
    gpus_per_engine: int = Field(1, ge=1, description="GPU mode: tensor-parallel size of each engine")
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM(...) keyword arguments")


@dataclass(frozen=True)
class JudgeSpec:
    """What an engine actor needs; plain data so it pickles to any node."""

    model_path: str
    model_name: str
    labels: list[dict]
    perspectives: list[dict]
    gen: dict
    engine_kwargs: dict
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    gold_hint: bool = False  # rationalise: tell the teacher each pair's gold label (distillation targets only)


OUTPUT_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("pair_id", pa.string()),
        ("query_id", pa.string()),
        ("split", pa.string()),
        ("perspective", pa.string()),
        ("sample_idx", pa.int32()),
        ("rationale", pa.string()),
        ("predicted_label", pa.string()),
        ("gold_label", pa.string()),
        ("parse_ok", pa.bool_()),
        ("parse_error", pa.string()),
        ("correct", pa.bool_()),
        ("raw_output", pa.string()),
        ("completion", pa.string()),
        ("prompt_messages", pa.string()),
        ("model", pa.string()),
        ("output_mode", pa.string()),
        ("sampling", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)


def task_id(pair_id: str, perspective: str, sample_idx: int) -> str:
    return f"{pair_id}\x1f{perspective}\x1f{sample_idx}"


def expand_tasks(pairs: pa.Table, perspectives: list[Perspective], samples: int, split: str) -> pa.Table:
    """pairs x perspectives x sample indices, in pair order; each row carries what its prompt needs."""
    rows = []
    for pair in pairs.to_pylist():
        for p in perspectives:
            for s in range(samples):
                rows.append(
                    {
                        "task_id": task_id(pair["pair_id"], p.name, s),
                        "pair_id": pair["pair_id"],
                        "query_id": pair["query_id"],
                        "split": split,
                        "perspective": p.name,
                        "sample_idx": s,
                        "query": pair["query"],
                        "title": pair["title"],
                        "attributes": pair["attributes"],
                        "gold_label": pair["label"],
                    }
                )
    return pa.Table.from_pylist(rows)


class VLLMJudge:
    """A Ray Data actor: holds one vLLM engine, turns a batch of tasks into judged rows."""

    def __init__(self, spec: JudgeSpec):
        from vllm import LLM

        self.spec = spec
        self.labels = [Label(**lab) for lab in spec.labels]
        self.perspectives = [Perspective(**p) for p in spec.perspectives]
        self.gen = GenerationConfig(**spec.gen)
        self.llm = LLM(model=spec.model_path, seed=self.gen.seed, **spec.engine_kwargs)
        if spec.chat_template:
            self.llm.get_tokenizer().chat_template = spec.chat_template

    def __call__(self, batch: pa.Table) -> pa.Table:
        return judge(self.llm, batch, self.gen, self.labels, self.perspectives, self.spec.model_name,
                     self.spec.chat_template_kwargs or {}, self.spec.gold_hint)


def judge(llm, tasks: pa.Table, gen: GenerationConfig, labels: list[Label], perspectives: list[Perspective],
          model_name: str, template_kwargs: dict | None = None, gold_hint: bool = False) -> pa.Table:
    """One vLLM pass (two in choice mode) over a batch of tasks -> rows of OUTPUT_SCHEMA. Never raises on bad output.

    gold_hint: each prompt states the task's gold label, and the constrained answer may only name that label."""
    tokenizer = llm.get_tokenizer()
    by_code = {lab.name: lab for lab in labels}
    by_name = {p.name: p for p in perspectives}
    rows_in = tasks.to_pylist()
    golds = [by_code[t["gold_label"]] if gold_hint else None for t in rows_in]
    per_label = {lab.name: _sampling_params(gen, [lab]) for lab in labels} if gold_hint else {}
    default = _sampling_params(gen, labels)
    sampling = [per_label[g.name] if g else default for g in golds]
    messages = [
        build_messages(
            {"query": t["query"], "title": t["title"], "attributes": json.loads(t["attributes"] or "{}")},
            by_name[t["perspective"]], labels, gen.output_mode, gen.rationale_max_chars, gen.max_attribute_chars, g,
        )
        for t, g in zip(rows_in, golds)
    ]
    prompts = [render_prompt(tokenizer, m, **(template_kwargs or {})) for m in messages]
    outs = llm.generate(prompts, [s["main"] for s in sampling], use_tqdm=False)
    raw = [o.outputs[0].text for o in outs]
    completion_tokens = [len(o.outputs[0].token_ids) for o in outs]
    if gen.output_mode == "choice":
        # second step: the label is a guided choice among label titles after the free rationale
        follow = [p + r.rstrip() + "\nLabel: " for p, r in zip(prompts, raw)]
        chosen = llm.generate(follow, [s["label"] for s in sampling], use_tqdm=False)
        parsed_all = [_parse_choice(r, c.outputs[0].text, labels) for r, c in zip(raw, chosen)]
        raw = [r.rstrip() + "\nLabel: " + c.outputs[0].text for r, c in zip(raw, chosen)]
        completion_tokens = [n + len(c.outputs[0].token_ids) for n, c in zip(completion_tokens, chosen)]
    else:
        parsed_all = [parse_output(text, labels, gen.output_mode) for text in raw]
    params = json.dumps({"temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": gen.max_tokens,
                         "repetition_penalty": gen.repetition_penalty, "seed": gen.seed})
    rows = []
    for t, m, o, text, ct, parsed in zip(rows_in, messages, outs, raw, completion_tokens, parsed_all):
        rows.append(
            {
                **{k: t[k] for k in ("task_id", "pair_id", "query_id", "split", "perspective", "sample_idx", "gold_label")},
                "rationale": parsed.rationale,
                "predicted_label": parsed.label,
                "parse_ok": parsed.ok,
                "parse_error": parsed.error,
                "correct": parsed.ok and parsed.label == t["gold_label"],
                "raw_output": text,
                "completion": format_completion(parsed.rationale, by_code[parsed.label].title, gen.output_mode)
                if parsed.ok
                else None,
                "prompt_messages": json.dumps(m, ensure_ascii=False),
                "model": model_name,
                "output_mode": gen.output_mode,
                "sampling": params,
                "prompt_tokens": len(o.prompt_token_ids),
                "completion_tokens": ct,
                "finish_reason": str(o.outputs[0].finish_reason),
            }
        )
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _parse_choice(rationale: str, choice: str, labels: list[Label]) -> ParsedJudgement:
    code = normalise_label(choice, labels)
    return ParsedJudgement(rationale.strip(), code, "" if code else f"label step returned {choice!r}")


def _sampling_params(gen: GenerationConfig, labels: list[Label]) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    base = {"temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": gen.max_tokens,
            "repetition_penalty": gen.repetition_penalty}
    out = {}
    if gen.output_mode == "json":
        out["main"] = SamplingParams(**base, structured_outputs=StructuredOutputsParams(regex=json_regex(labels, gen.rationale_max_chars)))
    else:
        out["main"] = SamplingParams(**base)
    if gen.output_mode == "choice":
        titles = [lab.title for lab in labels]
        # a guided choice may spell the title in any tokenization, down to one byte per token
        longest = max(len(t.encode()) for t in titles)
        out["label"] = SamplingParams(
            temperature=0.0, max_tokens=longest + 1, structured_outputs=StructuredOutputsParams(choice=titles)
        )
    return out


@dataclass
class GenerationResult:
    rationales_path: str
    rows: int
    generated_now: int
    reused: int
    seconds: float
    completion_tokens_now: int


def run_generation(
    tasks: pa.Table,
    out_dir: str | Path,
    spec: JudgeSpec,
    gen: GenerationConfig,
    progress: bool = True,
) -> GenerationResult:
    """Judge every task not already in `out_dir/parts/`, then consolidate into `out_dir/rationales.parquet`.

    `tasks` comes from `expand_tasks`. Ray must already be initialised (local or a cluster).
    """
    import ray

    out_dir = Path(out_dir)
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    done_ids = finished_task_ids(parts_dir)
    wanted = set(tasks.column("task_id").to_pylist())
    pending = tasks.filter(pc.invert(pc.is_in(tasks.column("task_id"), pa.array(sorted(done_ids), pa.string()))))
    reused = len(wanted & done_ids)
    generated, new_tokens = 0, 0
    if pending.num_rows:
        resources = ray.cluster_resources()
        place = engine_placement(
            gen.accelerator, resources.get("CPU", 1), resources.get("GPU", 0), gen.concurrency,
            gen.cpus_per_engine, gen.gpus_per_engine, largest_node_cpus(),
        )
        spec = JudgeSpec(**{**asdict(spec), "engine_kwargs": {**place.engine_defaults, **spec.engine_kwargs}})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, ours, counting judged rows
        # one block per batch, so each finished batch streams back (and is written) on its own
        blocks = [pending.slice(i, gen.batch_size) for i in range(0, pending.num_rows, gen.batch_size)]
        ds = ray.data.from_arrow(blocks).map_batches(
            VLLMJudge,
            fn_constructor_kwargs={"spec": spec},
            batch_size=gen.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=gen.concurrency),
            runtime_env={"env_vars": place.env} if place.env else None,
            **place.remote_args,
        )
        attempt = uuid.uuid4().hex[:8]
        bar = _progress(pending.num_rows, reused, progress)
        for i, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            write_parquet_atomic(batch, parts_dir / f"part-{attempt}-{i:05d}.parquet")
            generated += batch.num_rows
            new_tokens += sum(batch.column("completion_tokens").to_pylist())
            if bar:
                bar.update(batch.num_rows)
                bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - t0, 1e-9):.0f}")
        if bar:
            bar.close()
    table = consolidate(parts_dir, tasks)
    path = out_dir / "rationales.parquet"
    write_parquet_atomic(table, path)
    return GenerationResult(str(path), table.num_rows, generated, reused, time.time() - t0, new_tokens)


def largest_node_cpus() -> float:
    """The CPUs of the biggest alive node of the connected Ray cluster."""
    import ray

    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"mpcot generate ({done} reused)", unit="row", dynamic_ncols=True)


def finished_task_ids(parts_dir: Path) -> set[str]:
    ids: set[str] = set()
    for part in sorted(parts_dir.glob("part-*.parquet")):
        ids.update(pq.read_table(part, columns=["task_id"]).column("task_id").to_pylist())
    return ids


def consolidate(parts_dir: Path, tasks: pa.Table) -> pa.Table:
    """All parts -> one row per task of `tasks` (first write wins), in task order."""
    parts = [pq.read_table(p) for p in sorted(parts_dir.glob("part-*.parquet"))]
    table = pa.concat_tables(parts) if parts else OUTPUT_SCHEMA.empty_table()
    order = {tid: i for i, tid in enumerate(tasks.column("task_id").to_pylist())}
    keep, seen = [], set()
    for i, tid in enumerate(table.column("task_id").to_pylist()):
        if tid in order and tid not in seen:
            seen.add(tid)
            keep.append((order[tid], i))
    missing = len(order) - len(seen)
    if missing:
        raise RuntimeError(f"{missing} of {len(order)} tasks have no output in {parts_dir}; rerun to generate them")
    keep.sort()
    return table.take(pa.array([i for _, i in keep], pa.int64()))


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def consistency_filter(rationales: pa.Table) -> pa.Table:
    """SFT rows (conversational prompt/completion) from rationales whose label equals the gold label."""
    rows = []
    for r in rationales.filter(pc.field("correct")).to_pylist():
        rows.append(
            {
                "pair_id": r["pair_id"],
                "perspective": r["perspective"],
                "sample_idx": r["sample_idx"],
                "label": r["gold_label"],
                "prompt": json.loads(r["prompt_messages"]),
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
        )
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("pair_id", pa.string()), ("perspective", pa.string()), ("sample_idx", pa.int32()),
                        ("label", pa.string()), ("prompt", msg), ("completion", msg)])
    return pa.Table.from_pylist(rows, schema=schema)


def generation_stats(rationales: pa.Table, perspectives: list[str], labels: list[str]) -> dict:
    """Per-perspective parse rate and accuracy, prediction counts, and agreement between perspectives."""
    rows = rationales.to_pylist()
    stats: dict[str, Any] = {"rows": len(rows), "per_perspective": {}, "gold_label_counts": {}}
    for name in perspectives:
        mine = [r for r in rows if r["perspective"] == name]
        parsed = [r for r in mine if r["parse_ok"]]
        n = max(len(mine), 1)
        stats["per_perspective"][name] = {
            "rows": len(mine),
            "parse_rate": len(parsed) / n,
            "accuracy": sum(r["correct"] for r in mine) / n,
            "accuracy_of_parsed": sum(r["correct"] for r in parsed) / max(len(parsed), 1),
            "predicted_label_counts": {lab: sum(r["predicted_label"] == lab for r in parsed) for lab in labels},
            "mean_completion_tokens": sum(r["completion_tokens"] for r in mine) / n,
        }
    all_n = max(len(rows), 1)
    stats["overall"] = {
        "parse_rate": sum(r["parse_ok"] for r in rows) / all_n,
        "accuracy": sum(r["correct"] for r in rows) / all_n,
        "sft_rows": sum(r["correct"] for r in rows),
    }
    first = {}
    for r in rows:
        if r["sample_idx"] == 0:
            first.setdefault(r["pair_id"], {})[r["perspective"]] = r
    gold = {pid: next(iter(v.values()))["gold_label"] for pid, v in first.items()}
    stats["gold_label_counts"] = {lab: sum(g == lab for g in gold.values()) for lab in labels}
    agree = {}
    for i, a in enumerate(perspectives):
        for b in perspectives[i + 1 :]:
            both = [v for v in first.values() if a in v and b in v and v[a]["parse_ok"] and v[b]["parse_ok"]]
            agree[f"{a}~{b}"] = sum(v[a]["predicted_label"] == v[b]["predicted_label"] for v in both) / max(len(both), 1)
    full = [v for v in first.values() if len(v) == len(perspectives) and all(r["parse_ok"] for r in v.values())]
    stats["agreement"] = {
        "pairwise": agree,
        "all_perspectives_agree": sum(len({r["predicted_label"] for r in v.values()}) == 1 for v in full) / max(len(full), 1),
        "pairs_with_any_correct": sum(any(r["correct"] for r in v.values()) for v in first.values()) / max(len(first), 1),
        "pairs_with_conflict": sum(
            any(r["correct"] for r in v.values()) and not all(r["correct"] for r in v.values()) for v in first.values()
        ) / max(len(first), 1),
    }
    return stats
