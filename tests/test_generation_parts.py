"""The generation stage's bookkeeping without an engine: tasks streamed from Parquet, the resume check, parts ->
a Parquet dataset, and stats, SFT rows and conflict mining read from it in batches."""
import json
import random

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from mpcot.conflicts import PreferenceDataError, add_resampled, mine_conflict_pairs
from mpcot.config import GenerationConfig
from mpcot.generate import GenerationResult, _PartWriter, consolidate, part_path, scan_parts
from mpcot.judge import task_messages
from mpcot.rationales import PromptMismatch, consistency_filter, generation_stats
from mpcot.tasks import OUTPUT_SCHEMA, PairSource, TaskPlan, expand_tasks, task_batches
from mpcot.labels import DEFAULT_ESCI_LABELS, Label
from mpcot.perspectives import DEFAULT_PERSPECTIVES, NEUTRAL_PERSPECTIVE, Perspective
from mpcot.prompts import build_messages, format_completion, prompt_hash
from pairs.parquet import ParquetDatasetWriter, pair_groups

PERSPECTIVES = [Perspective(**p) for p in DEFAULT_PERSPECTIVES]
NAMES = tuple(p.name for p in PERSPECTIVES)
LABELS = [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
GEN = GenerationConfig(rationale_max_chars=40)


def pairs_table(n: int, start: int = 0) -> pa.Table:
    rng = random.Random(start)
    return pa.Table.from_pylist([
        {"pair_id": f"p{i}", "query_id": f"q{i // 3}", "product_id": f"B{i}", "query": f"usb cable {i // 3}",
         "title": f"Anker <b>USB-C</b> cable {i}", "label": rng.choice("ESCI"),
         "attributes": json.dumps({"brand": "Anker", "color": "black &amp; red"} if i % 2 else {})}
        for i in range(start, start + n)
    ])


def fake_judge(tasks: pa.Table, gen: GenerationConfig = GEN, seed: int = 0) -> pa.Table:
    """What `judge` writes, with a random label instead of an engine's answer (and the prompt hash it would keep)."""
    rng = random.Random(seed)
    labels = {lab: title for lab, title in zip("ESCI", ("Exact", "Substitute", "Complement", "Irrelevant"))}
    by_name = {p.name: p for p in [*PERSPECTIVES, NEUTRAL_PERSPECTIVE]}
    rows = []
    for t in tasks.to_pylist():
        ok = rng.random() > 0.1
        label = rng.choice("ESCI") if ok else None
        msgs = task_messages(t, by_name[t["perspective"]], LABELS, gen)
        rows.append({**t, "rationale": f"why {t['task_id']}" if ok else "", "predicted_label": label, "parse_ok": ok,
                     "parse_error": "" if ok else "no label", "correct": ok and label == t["gold_label"],
                     "raw_output": "x", "completion": format_completion(f"why {t['task_id']}", labels[label], "json") if ok else None,
                     "prompt_hash": prompt_hash(msgs), "model": "fake", "output_mode": "json", "sampling": "{}",
                     "prompt_tokens": 10, "completion_tokens": rng.randint(1, 9), "finish_reason": "stop"})
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


@pytest.fixture
def plan(tmp_path):
    pq.write_table(pairs_table(50), tmp_path / "train.parquet", row_group_size=7)
    pq.write_table(pairs_table(5, start=100), tmp_path / "val.parquet")
    return TaskPlan((PairSource("train", str(tmp_path / "train.parquet"), 40),
                     PairSource("val", str(tmp_path / "val.parquet"))), NAMES, 2)


def test_plan_streams_what_expand_tasks_makes(plan):
    expected = pa.concat_tables([expand_tasks(pairs_table(50).slice(0, 40), PERSPECTIVES, 2, "train"),
                                 expand_tasks(pairs_table(5, start=100), PERSPECTIVES, 2, "val")])
    batches = list(task_batches(plan, 7))
    assert plan.num_tasks() == expected.num_rows == 45 * 3 * 2
    assert [b.num_rows for b in batches] == [7] * (270 // 7) + [270 % 7]
    got = pa.concat_tables(batches)
    assert got.column("task_index").to_pylist() == list(range(270))
    assert got.drop_columns(["task_index"]).to_pylist() == expected.drop_columns(["task_index"]).to_pylist()
    # a task table concatenated from several expand_tasks calls is numbered afresh, in its row order
    assert pa.concat_tables(list(task_batches(expected, 7))).to_pylist() == got.to_pylist()
    # a pair's tasks are adjacent and in perspective x sample order
    first = got.slice(0, 6).to_pylist()
    assert {r["pair_id"] for r in first} == {"p0"} and [(r["perspective"], r["sample_idx"]) for r in first] == [
        (n, s) for n in NAMES for s in (0, 1)]


def test_resume_reuses_matching_parts_and_ends_with_one_row_per_task_in_order(plan, tmp_path):
    parts, size = tmp_path / "parts", 8
    parts.mkdir()
    batches = list(task_batches(plan, size))
    writer = _PartWriter(parts, size, plan.num_tasks())
    # a killed first attempt: batches 0-2 arrived in one block, batch 5 split over two, batch 9 only half
    writer.add(fake_judge(pa.concat_tables(batches[:3])))
    writer.add(fake_judge(batches[5].slice(0, 3)))
    writer.add(fake_judge(batches[5].slice(3)))
    writer.add(fake_judge(batches[9].slice(0, 4)))
    assert sorted(p.name for p in parts.glob("batch-*")) == [part_path(parts, k).name for k in (0, 1, 2, 5)]
    # a part holding other tasks (the pairs changed) and one beyond the last batch are not kept
    pq.write_table(fake_judge(batches[6]).slice(0, 5), part_path(parts, 1))
    pq.write_table(fake_judge(batches[0]), part_path(parts, 999))

    pending = scan_parts(plan, parts, size, max_chunks=4)
    assert (pending.total, pending.reused) == (270, 3 * size)
    assert pending.tasks == 270 - 3 * size and len(pending.chunks) == 4
    assert not part_path(parts, 1).exists() and not part_path(parts, 999).exists()
    todo = pa.concat_tables([pq.read_table(c) for c in pending.chunks])
    assert set(todo.column("task_index").to_pylist()) == set(range(270)) - {*range(0, 8), *range(16, 24), *range(40, 48)}

    with pytest.raises(RuntimeError, match=f"{270 - 3 * size} of 270 tasks have no output"):
        consolidate(parts, 270, size, tmp_path / "rationales.parquet")
    writer = _PartWriter(parts, size, plan.num_tasks())  # the second attempt
    writer.add(fake_judge(batches[9].slice(0, 4), seed=2))  # rows of a retried actor call, then all of them again
    for c in pending.chunks:
        writer.add(fake_judge(pq.read_table(c), seed=1))
    out = tmp_path / "rationales.parquet"
    out.write_bytes(b"a single-file table of an older version")
    consolidate(parts, 270, size, out, file_rows=50)

    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:05d}.parquet" for i in range(6)]
    table = pq.read_table(out)
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.column("task_id").to_pylist() == pa.concat_tables(batches).column("task_id").to_pylist()
    assert pq.read_table(out, columns=["pair_id", "rationale"]).num_rows == 270
    assert pds.dataset(out).count_rows() == 270 and pq.ParquetFile(out / "part-00005.parquet").metadata.num_rows == 20
    assert scan_parts(plan, parts, size).tasks == 0  # a rerun after the kill of a finished run judges nothing


def _reference_stats(rows: list[dict], perspectives: list[str], labels: list[str]) -> dict:
    """The stats as computed before they were streamed (every row in memory): the values must not change."""
    stats = {"rows": len(rows), "per_perspective": {}, "gold_label_counts": {}}
    for name in perspectives:
        mine = [r for r in rows if r["perspective"] == name]
        parsed = [r for r in mine if r["parse_ok"]]
        n = max(len(mine), 1)
        stats["per_perspective"][name] = {
            "rows": len(mine), "parse_rate": len(parsed) / n, "accuracy": sum(r["correct"] for r in mine) / n,
            "accuracy_of_parsed": sum(r["correct"] for r in parsed) / max(len(parsed), 1),
            "predicted_label_counts": {lab: sum(r["predicted_label"] == lab for r in parsed) for lab in labels},
            "mean_completion_tokens": sum(r["completion_tokens"] for r in mine) / n,
        }
    all_n = max(len(rows), 1)
    stats["overall"] = {"parse_rate": sum(r["parse_ok"] for r in rows) / all_n,
                        "accuracy": sum(r["correct"] for r in rows) / all_n, "sft_rows": sum(r["correct"] for r in rows)}
    first = {}
    for r in rows:
        if r["sample_idx"] == 0:
            first.setdefault(r["pair_id"], {})[r["perspective"]] = r
    gold = {pid: next(iter(v.values()))["gold_label"] for pid, v in first.items()}
    stats["gold_label_counts"] = {lab: sum(g == lab for g in gold.values()) for lab in labels}
    agree = {}
    for i, a in enumerate(perspectives):
        for b in perspectives[i + 1:]:
            both = [v for v in first.values() if a in v and b in v and v[a]["parse_ok"] and v[b]["parse_ok"]]
            agree[f"{a}~{b}"] = sum(v[a]["predicted_label"] == v[b]["predicted_label"] for v in both) / max(len(both), 1)
    full = [v for v in first.values() if len(v) == len(perspectives) and all(r["parse_ok"] for r in v.values())]
    stats["agreement"] = {
        "pairwise": agree,
        "all_perspectives_agree": sum(len({r["predicted_label"] for r in v.values()}) == 1 for v in full) / max(len(full), 1),
        "pairs_with_any_correct": sum(any(r["correct"] for r in v.values()) for v in first.values()) / max(len(first), 1),
        "pairs_with_conflict": sum(any(r["correct"] for r in v.values()) and not all(r["correct"] for r in v.values())
                                   for v in first.values()) / max(len(first), 1),
    }
    return stats


def _dataset(path, table: pa.Table, file_rows: int = 13):
    """Files of 13 rows: a pair's 6 rows are often split between two files."""
    with ParquetDatasetWriter(path, table.schema, file_rows=file_rows, group_rows=5) as sink:
        for i in range(0, table.num_rows, 4):
            sink.write(table.slice(i, 4))
    return path


def test_streamed_stats_equal_the_in_memory_ones(plan, tmp_path):
    table = fake_judge(pa.concat_tables(list(task_batches(plan, 64))))
    path = _dataset(tmp_path / "rationales.parquet", table)
    assert len(list(path.iterdir())) == 21
    groups = list(pair_groups(path, ["pair_id", "perspective"]))
    assert len(groups) == 45 and all(len(g) == 6 for g in groups)
    stats = generation_stats(path, list(NAMES), list("ESCI"))
    assert json.dumps(stats) == json.dumps(_reference_stats(table.to_pylist(), list(NAMES), list("ESCI")))
    assert 0 < stats["overall"]["sft_rows"] < table.num_rows and 0 < stats["agreement"]["pairs_with_conflict"] < 1


def test_sft_rows_rebuild_the_prompt_the_teacher_was_given(plan, tmp_path, labels):
    table = fake_judge(pa.concat_tables(list(task_batches(plan, 64))))
    path = _dataset(tmp_path / "rationales.parquet", table)
    n = consistency_filter(path, tmp_path / "sft.parquet", PERSPECTIVES, labels, GEN)
    sft = pq.read_table(tmp_path / "sft.parquet").to_pylist()
    correct = [r for r in table.to_pylist() if r["correct"]]
    assert n == len(sft) == len(correct) > 0
    by_name = {p.name: p for p in PERSPECTIVES}
    for row, r in zip(sft, correct):
        pair = {"query": r["query"], "title": r["title"], "attributes": json.loads(r["attributes"])}
        assert row["prompt"] == build_messages(pair, by_name[r["perspective"]], labels, "json", 40, GEN.max_attribute_chars)
        assert row["completion"] == [{"role": "assistant", "content": r["completion"]}]
        assert (row["pair_id"], row["perspective"], row["label"]) == (r["pair_id"], r["perspective"], r["gold_label"])
    # a prompt that cannot be rebuilt (here: another rationale length limit than at generation) is an error
    with pytest.raises(PromptMismatch, match=r"pair 'p\d+' \(\w+\) is not the one the teacher was given"):
        consistency_filter(path, tmp_path / "sft2.parquet", PERSPECTIVES, labels, GEN.model_copy(update={"rationale_max_chars": 41}))
    assert not (tmp_path / "sft2.parquet").exists()


@pytest.mark.parametrize("k", [0, 2])
def test_dpo_pairs_mined_pair_by_pair_equal_the_in_memory_mining(plan, tmp_path, monkeypatch, k):
    import workflows.stages.teacher as stages
    from workflows.config import load_config

    cfg = load_config("configs/smoke.yaml", [f"dpo.pass_k={k}"])
    table = fake_judge(pa.concat_tables(list(task_batches(plan, 64))), cfg.generation)
    _dataset(tmp_path / "mpcot" / "rationales.parquet", table)
    resampled = {}

    def judge_resamples(tasks, out_dir, spec, gen, progress=True):  # the SFT teacher, without an engine
        assert (spec.model_name, tasks.perspectives, tasks.samples) == ("sft", (NEUTRAL_PERSPECTIVE.name,), k)
        resampled["table"] = fake_judge(pa.concat_tables(list(task_batches(tasks, 64))), gen, seed=3)
        path = _dataset(out_dir / "rationales.parquet", resampled["table"])
        return GenerationResult(str(path), resampled["table"].num_rows, 0, 0, 0.0, 0)

    monkeypatch.setattr(stages, "run_generation", judge_resamples)
    monkeypatch.setattr(stages, "ensure_ray", lambda: None)
    path, counts = stages.preferences(cfg, tmp_path, tmp_path / "sft-model")

    mined = mine_conflict_pairs(table.to_pylist())
    expected = add_resampled(mined, resampled["table"].to_pylist() if k else [], k)
    assert counts == expected.counts
    assert counts["need_resample"] > 0 and counts["from_rationales"] > 0
    assert (counts["rescued_by_resampling"] > 0) == bool(k) and counts["skipped_no_correct"] > 0
    pairs = {r["pair_id"]: r for r in table.to_pylist()}
    g = cfg.generation
    got = pq.read_table(path).to_pylist()
    assert len(got) == len(expected.rows) == counts["preference_rows"]
    for row, r in zip(got, expected.rows):
        pair = pairs[r["pair_id"]]
        shown = {"query": pair["query"], "title": pair["title"], "attributes": json.loads(pair["attributes"])}
        prompt = build_messages(shown, NEUTRAL_PERSPECTIVE, cfg.labels, g.output_mode, g.rationale_max_chars, g.max_attribute_chars)
        assert row == {"pair_id": r["pair_id"], "prompt": prompt, "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}], "source": r["source"],
                       "chosen_perspective": r["chosen_perspective"], "rejected_perspective": r["rejected_perspective"]}


def test_dpo_table_problems_name_the_row_and_leave_no_file(plan, tmp_path, monkeypatch):
    import workflows.stages.teacher as stages
    from workflows.config import load_config

    cfg = load_config("configs/smoke.yaml", ["dpo.pass_k=0"])
    table = fake_judge(pa.concat_tables(list(task_batches(plan, 64))), cfg.generation)
    same = pa.array(["same answer" if c else None for c in table.column("parse_ok").to_pylist()], pa.string())
    _dataset(tmp_path / "mpcot" / "rationales.parquet", table.set_column(table.schema.get_field_index("completion"), "completion", same))
    with pytest.raises(PreferenceDataError, match=r"preferences.parquet row 0 \(pair 'p\d+'\): chosen and rejected are identical"):
        stages.preferences(cfg, tmp_path, tmp_path / "sft-model")
    assert not list((tmp_path / "teacher" / "dpo").glob("*preferences*"))
