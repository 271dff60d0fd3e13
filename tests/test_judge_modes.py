"""The vLLM judging step on a tiny random Qwen2, in every output mode, with one engine for the module."""
import json

import pyarrow as pa
import pytest

from mpcot.config import GenerationConfig
from mpcot.judge import judge
from mpcot.tasks import OUTPUT_SCHEMA, expand_tasks
from mpcot.perspectives import DEFAULT_PERSPECTIVES, Perspective

pytestmark = pytest.mark.vllm
PERSPECTIVES = [Perspective(**p) for p in DEFAULT_PERSPECTIVES]


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as the stages run it (mpcot/placement.py)
    from vllm import LLM

    from mpcot.placement import engine_kwargs, engine_placement

    # the CPU engine as the stages build it (no chunked prefill; the step budget holds the longest prompt)
    kwargs = engine_kwargs(engine_placement("cpu", 2, 0, 1, None, 1, 2), {"max_num_batched_tokens": 2048, "dtype": "float32"})
    engine = LLM(model=tiny_qwen2, seed=0, **kwargs)
    yield engine
    del engine


@pytest.fixture(scope="module")
def tasks():
    pairs = pa.Table.from_pylist(
        [
            {"pair_id": f"p{i}", "query_id": f"q{i}", "product_id": "", "query": f"usb cable {i}",
             "title": f"Anker USB-C cable {i} ft", "attributes": json.dumps({"brand": "Anker"} if i % 2 else {}),
             "label": "ESCI"[i % 4]}
            for i in range(4)
        ]
    )
    return expand_tasks(pairs, PERSPECTIVES, 2, "train")


def test_expand_tasks_is_pairs_times_perspectives_times_samples(tasks):
    assert tasks.num_rows == 4 * 3 * 2
    assert len(set(tasks.column("task_id").to_pylist())) == 24


@pytest.mark.parametrize("mode", ["json", "choice"])
def test_structured_modes_always_parse(llm, tasks, labels, mode):
    gen = GenerationConfig(output_mode=mode, temperature=0.8, max_tokens=80, rationale_max_chars=20)
    out = judge(llm, tasks, gen, labels, PERSPECTIVES, "tiny")
    assert out.schema.equals(OUTPUT_SCHEMA)
    assert out.num_rows == tasks.num_rows
    assert out.column("task_id").to_pylist() == tasks.column("task_id").to_pylist()
    assert all(out.column("parse_ok").to_pylist()), [(r["parse_error"], r["raw_output"][-40:]) for r in out.to_pylist() if not r["parse_ok"]]
    assert set(out.column("predicted_label").to_pylist()) <= {"E", "S", "C", "I"}
    rows = out.to_pylist()
    for r in rows:
        assert r["correct"] == (r["predicted_label"] == r["gold_label"])
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
    if mode == "choice":
        assert all(r["raw_output"].split("\nLabel: ")[-1] in {"Exact", "Substitute", "Complement", "Irrelevant"} for r in rows)


def test_a_sampled_answer_depends_on_its_task_not_on_its_batch(llm, tasks, labels):
    """At temperature > 0 each task draws from its own seed: the same task gets the same answer whatever tasks
    share its batch and in whatever order; another sample index of the same prompt gets another answer. The prompts
    are long enough that the batch takes several prefill steps (the DPO resample's shape, where a prompt split
    across steps crashed seeded sampling on CPU)."""
    long = pa.Table.from_pylist([{**r, "title": r["title"] + " braided nylon fast charging" * 40} for r in tasks.to_pylist()],
                                schema=tasks.schema)
    gen = GenerationConfig(output_mode="json", temperature=0.9, max_tokens=60, rationale_max_chars=30)
    whole = judge(llm, long, gen, labels, PERSPECTIVES, "tiny").to_pylist()
    assert sum(r["prompt_tokens"] for r in whole) > 2 * 2048  # more than one step's budget
    order = list(range(tasks.num_rows))[::-1][::3]  # a third of the tasks, reversed: other batch slots and partners
    part = judge(llm, long.take(order), gen, labels, PERSPECTIVES, "tiny").to_pylist()
    assert [r["raw_output"] for r in part] == [whole[i]["raw_output"] for i in order]
    by_prompt: dict = {}
    for r in whole:
        by_prompt.setdefault((r["pair_id"], r["perspective"]), set()).add(r["raw_output"])
    assert any(len(v) == 2 for v in by_prompt.values())  # two samples of one prompt are two draws


def test_rationale_rows_rebuild_the_prompts_the_engine_was_given(llm, tasks, labels, tmp_path):
    """Rows keep the pair's fields and a prompt hash, not the prompt: SFT rebuilds it, and it is the text vLLM got."""
    import pyarrow.parquet as pq

    from mpcot.rationales import consistency_filter
    from mpcot.prompts import render_prompt

    given = []

    class Recording:
        def get_tokenizer(self):
            return llm.get_tokenizer()

        def generate(self, prompts, params, use_tqdm=False):
            given.extend(prompts)
            return llm.generate(prompts, params, use_tqdm=use_tqdm)

    gen = GenerationConfig(output_mode="json", temperature=0.8, max_tokens=80, rationale_max_chars=20)
    out = judge(Recording(), tasks, gen, labels, PERSPECTIVES, "tiny")
    assert "prompt_messages" not in out.column_names and len(given) == out.num_rows
    everyone = out.set_column(out.schema.get_field_index("correct"), "correct", pa.array([True] * out.num_rows))
    pq.write_table(everyone, tmp_path / "rationales.parquet")
    assert consistency_filter(tmp_path / "rationales.parquet", tmp_path / "sft.parquet", PERSPECTIVES, labels, gen) == out.num_rows
    sft = pq.read_table(tmp_path / "sft.parquet").to_pylist()
    assert [render_prompt(llm.get_tokenizer(), r["prompt"]) for r in sft] == given


def test_free_text_failures_are_kept_and_flagged(llm, tasks, labels):
    gen = GenerationConfig(output_mode="free_text", temperature=0.8, max_tokens=16)
    out = judge(llm, tasks, gen, labels, PERSPECTIVES, "tiny").to_pylist()
    assert len(out) == tasks.num_rows  # nothing dropped
    failed = [r for r in out if not r["parse_ok"]]
    assert failed, "a random model should not produce a 'Label:' line in 16 tokens"
    for r in failed:
        assert r["predicted_label"] is None and r["correct"] is False and r["parse_error"]
        assert r["completion"] is None


def test_cpu_engine_never_asks_for_more_cpus_than_one_node_has():
    from mpcot.placement import engine_placement

    # two nodes of one CPU each: an engine asking for both would never be scheduled
    assert engine_placement("cpu", 2, 0, 1, None, 1, node_cpus=1).remote_args == {"num_cpus": 1}
    assert engine_placement("auto", 16, 0, 2, None, 1, node_cpus=16).remote_args == {"num_cpus": 8}
    place = engine_placement("cpu", 4, 0, 1, None, 1, node_cpus=4)
    assert place.remote_args == {"num_cpus": 4} and place.env["OMP_NUM_THREADS"] == "4"
    assert engine_placement("cpu", 8, 0, 1, 3, 1, node_cpus=2).remote_args == {"num_cpus": 3}  # explicit wins
    assert engine_placement("auto", 96, 8, 8, None, 1).remote_args == {"num_cpus": 1, "num_gpus": 1}
