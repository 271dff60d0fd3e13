"""An engine actor judging several jobs (teacher eval's three models) switches models in its own process on CPU,
stopping each engine before the next starts; on GPU each model keeps its own actors."""
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq

from mpcot.config import GenerationConfig
from mpcot.labels import DEFAULT_ESCI_LABELS
from mpcot.perspectives import DEFAULT_PERSPECTIVES


def test_an_engine_actor_switches_models_stopping_each_engine_first(tmp_path, monkeypatch):
    from mpcot import judge as judge_mod
    from mpcot.judge import JudgeSpec, VLLMJudge

    events = []

    class FakeLLM:  # what VLLMJudge asks of vllm.LLM: a constructor, its engine core's shutdown
        def __init__(self, model, seed, **kwargs):
            events.append(("start", model))
            self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(
                shutdown=lambda: events.append(("stop", model))))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(judge_mod, "judge", lambda llm, tasks, *a, **k: pa.table({"task_index": tasks.column("task_index")}))
    gen = GenerationConfig(batch_size=2).model_dump()
    specs = [JudgeSpec(f"model-{m}", m, list(DEFAULT_ESCI_LABELS), list(DEFAULT_PERSPECTIVES), gen, {}) for m in "ab"]
    chunks = []
    for i, job in enumerate([0, 0, 1, 1, 0]):
        pq.write_table(pa.table({"task_index": [2 * i, 2 * i + 1]}), tmp_path / f"c{i}.parquet")
        chunks.append((str(tmp_path / f"c{i}.parquet"), job))
    actor = VLLMJudge(specs)
    assert events == []  # no engine before a chunk asks for one
    out = list(actor(pa.table({"path": [c for c, _ in chunks], "job": pa.array([j for _, j in chunks], pa.int32())})))
    # one engine per run of one job's chunks; each stopped before the next starts
    assert events == [("start", "model-a"), ("stop", "model-a"), ("start", "model-b"), ("stop", "model-b"),
                      ("start", "model-a")]
    assert [t.column("job").to_pylist() for t in out] == [[0, 0], [0, 0], [1, 1], [1, 1], [0, 0]]
    del actor  # Ray Data retiring the actor stops the last engine
    assert events[-1] == ("stop", "model-a")


def test_only_cpu_engine_actors_switch_models():
    from mpcot.placement import engine_placement

    assert engine_placement("cpu", 2, 0, 1, None, 1, node_cpus=2).switches_models
    assert not engine_placement("auto", 96, 8, 8, None, 1).switches_models
    assert not engine_placement("gpu", 96, 8, 2, None, 4).switches_models
