"""The vLLM judge: a task's chat messages, the sampling parameters (one seed per task), and one engine pass over a
batch of tasks into rationale rows; `VLLMJudge`, the Ray Data actor holding an engine."""
from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mpcot.config import GenerationConfig
from mpcot.labels import Label
from mpcot.parsing import ParsedJudgement, normalise_label, parse_output
from mpcot.perspectives import Perspective
from mpcot.prompts import build_messages, format_completion, json_regex, prompt_hash, render_prompt
from mpcot.tasks import OUTPUT_SCHEMA, TASK_SCHEMA


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


def task_messages(row: dict, perspective: Perspective, labels: list[Label], gen: GenerationConfig,
                  gold: Label | None = None) -> list[dict[str, str]]:
    """The chat messages of a task, or of a rationale row (which keeps its pair's query, title and attributes):
    the same call at generation time and when SFT/DPO rebuild the prompt."""
    pair = {"query": row["query"], "title": row["title"], "attributes": json.loads(row["attributes"] or "{}")}
    return build_messages(pair, perspective, labels, gen.output_mode, gen.rationale_max_chars, gen.max_attribute_chars, gold)


class VLLMJudge:
    """A Ray Data actor: holds one vLLM engine at a time, reads pending tasks from the chunk files it is given and
    turns each batch into judged rows. A chunk names its job (`specs[job]`: the model and prompts); a chunk of
    another job than the engine's stops the engine and starts that job's (in the same process: no second `import
    vllm`, the costly part of an engine start on CPU). Each output row carries its `job`."""

    def __init__(self, specs: list[JudgeSpec]):
        self.specs, self.job, self.llm = specs, None, None

    def _use(self, job: int) -> None:
        if job == self.job:
            return
        self._stop()
        from vllm import LLM

        spec = self.spec = self.specs[job]
        self.labels = [Label(**lab) for lab in spec.labels]
        self.perspectives = [Perspective(**p) for p in spec.perspectives]
        self.gen = GenerationConfig(**spec.gen)
        self.llm = LLM(model=spec.model_path, seed=self.gen.seed, **spec.engine_kwargs)
        if spec.chat_template:
            self.llm.get_tokenizer().chat_template = spec.chat_template
        self.job = job

    def _stop(self, collect: bool = True) -> None:
        """The engine (and its engine process, where it has one) stops now, its memory freed before another starts."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            with suppress(Exception):  # a dead engine has nothing left to stop
                core.shutdown()
        self.llm, self.job = None, None
        if collect:
            gc.collect()

    def __del__(self):
        """Ray Data deletes its UDF when it retires the actor gracefully: the engine stops here, while the actor still
        lives, not when Ray reaps the actor's children (an engine process that outlived its resource tracker printed
        KeyError tracebacks)."""
        self._stop(collect=False)

    def __call__(self, chunks: pa.Table) -> Iterator[pa.Table]:
        """`chunks`: paths of pending-task files (whole batches, in order) and their jobs; one vLLM call and one output
        per batch."""
        for path, job in zip(chunks.column("path").to_pylist(), chunks.column("job").to_pylist()):
            self._use(job)
            tasks = pq.read_table(path)
            for i in range(0, tasks.num_rows, self.gen.batch_size):
                out = judge(self.llm, tasks.slice(i, self.gen.batch_size), self.gen, self.labels, self.perspectives,
                            self.spec.model_name, self.spec.chat_template_kwargs or {}, self.spec.gold_hint)
                yield out.append_column("job", pa.array([job] * out.num_rows, pa.int32()))


def judge(llm, tasks: pa.Table, gen: GenerationConfig, labels: list[Label], perspectives: list[Perspective],
          model_name: str, template_kwargs: dict | None = None, gold_hint: bool = False) -> pa.Table:
    """One vLLM pass (two in choice mode) over a batch of tasks -> rows of OUTPUT_SCHEMA. Never raises on bad output.

    gold_hint: each prompt states the task's gold label, and the constrained answer may only name that label."""
    tokenizer = llm.get_tokenizer()
    by_code = {lab.name: lab for lab in labels}
    by_name = {p.name: p for p in perspectives}
    rows_in = tasks.to_pylist()
    golds = [by_code[t["gold_label"]] if gold_hint else None for t in rows_in]
    # sampled answers: one seed per task (greedy needs none)
    seeds = [task_seed(gen.seed, t) for t in rows_in] if gen.temperature > 0 else [None] * len(rows_in)
    sampling = [_sampling_params(gen, [g] if g else labels, s) for g, s in zip(golds, seeds)]
    messages = [task_messages(t, by_name[t["perspective"]], labels, gen, g) for t, g in zip(rows_in, golds)]
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
                **{k: t[k] for k in TASK_SCHEMA.names},
                "rationale": parsed.rationale,
                "predicted_label": parsed.label,
                "parse_ok": parsed.ok,
                "parse_error": parsed.error,
                "correct": parsed.ok and parsed.label == t["gold_label"],
                "raw_output": text,
                "completion": format_completion(parsed.rationale, by_code[parsed.label].title, gen.output_mode)
                if parsed.ok
                else None,
                "prompt_hash": prompt_hash(m),
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


def task_seed(seed: int, task: dict) -> int:
    """The sampling seed of one task: a pure function of (seed, pair, perspective, sample), so a sampled answer does
    not depend on which tasks shared its batch, the slot the engine gave it, or a resume. With the engine's seed alone
    every request drew from one shared stream by batch slot: two smoke runs resampled the same 8 answers for DPO, each
    given to the next task over (measured; bench/determinism.py)."""
    key = f"{seed}|{task['pair_id']}|{task['perspective']}|{task['sample_idx']}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def _sampling_params(gen: GenerationConfig, labels: list[Label], seed: int | None = None) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    base = {"temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": gen.max_tokens,
            "repetition_penalty": gen.repetition_penalty, "seed": seed}
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
