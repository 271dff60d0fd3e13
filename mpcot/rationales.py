"""What is read back from a rationales dataset: the SFT rows (consistency filter, each prompt rebuilt and checked)
and the generation statistics (parse rate, accuracy, agreement between perspectives)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mpcot.config import GenerationConfig
from mpcot.judge import task_messages
from mpcot.labels import Label
from mpcot.perspectives import Perspective
from mpcot.prompts import prompt_hash
from pairs.parquet import atomic_parquet_writer, pair_groups, read_batches


class PromptMismatch(RuntimeError):
    """A prompt rebuilt from a rationale row is not the one the teacher was given."""


def rebuilt_messages(row: dict, perspectives: dict[str, Perspective], labels: list[Label], gen: GenerationConfig,
                     where: str) -> list[dict[str, str]]:
    """The messages a rationale row was generated from, rebuilt from its pair's fields and the config, and checked
    against the row's prompt_hash."""
    perspective = perspectives.get(row["perspective"])
    if perspective is None:
        raise PromptMismatch(f"{where}: pair {row['pair_id']!r} was judged from perspective {row['perspective']!r}, "
                             "which the config no longer has; generate again")
    messages = task_messages(row, perspective, labels, gen)
    if prompt_hash(messages) != row["prompt_hash"]:
        raise PromptMismatch(
            f"{where}: the prompt rebuilt for pair {row['pair_id']!r} ({row['perspective']}) is not the one the teacher "
            f"was given (prompt hash {row['prompt_hash']}, rebuilt {prompt_hash(messages)}): the prompt code, labels or "
            "generation settings changed since; generate again"
        )
    return messages


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))  # TRL's conversational format
SFT_SCHEMA = pa.schema([("pair_id", pa.string()), ("perspective", pa.string()), ("sample_idx", pa.int32()),
                        ("label", pa.string()), ("prompt", MESSAGES), ("completion", MESSAGES)])
_SFT_SOURCE = ["pair_id", "perspective", "sample_idx", "gold_label", "completion", "correct", "query", "title",
               "attributes", "prompt_hash"]


def consistency_filter(rationales_path: str | Path, out_path: str | Path, perspectives: list[Perspective],
                       labels: list[Label], gen: GenerationConfig) -> int:
    """SFT rows (conversational prompt/completion) from the rationales whose label equals the gold label, streamed
    from the rationales dataset into `out_path`; each prompt rebuilt and checked (`rebuilt_messages`). Returns the
    number of rows."""
    by_name = {p.name: p for p in perspectives}
    rows_out = 0
    with atomic_parquet_writer(out_path, SFT_SCHEMA) as writer:
        for batch in read_batches(rationales_path, _SFT_SOURCE, keep=pc.field("correct")):
            rows = [
                {
                    "pair_id": r["pair_id"],
                    "perspective": r["perspective"],
                    "sample_idx": r["sample_idx"],
                    "label": r["gold_label"],
                    "prompt": rebuilt_messages(r, by_name, labels, gen, str(rationales_path)),
                    "completion": [{"role": "assistant", "content": r["completion"]}],
                }
                for r in batch.to_pylist()
            ]
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA))
                rows_out += len(rows)
    return rows_out


def generation_stats(rationales_path: str | Path, perspectives: list[str], labels: list[str]) -> dict:
    """Per-perspective parse rate and accuracy, prediction counts, and agreement between perspectives, counted over
    the rationales dataset in batches (and pair by pair, for agreement)."""
    counts = {name: {"rows": 0, "parsed": 0, "correct": 0, "tokens": 0, "predicted": dict.fromkeys(labels, 0)}
              for name in perspectives}
    total = parsed = correct = 0
    for batch in read_batches(rationales_path, ["perspective", "parse_ok", "correct", "predicted_label", "completion_tokens"]):
        total += batch.num_rows
        parsed += pc.sum(batch.column("parse_ok")).as_py() or 0
        correct += pc.sum(batch.column("correct")).as_py() or 0
        sums = batch.group_by("perspective").aggregate(
            [([], "count_all"), ("parse_ok", "sum"), ("correct", "sum"), ("completion_tokens", "sum")])
        for g in sums.to_pylist():
            if g["perspective"] in counts:
                c = counts[g["perspective"]]
                c["rows"] += g["count_all"]
                c["parsed"] += g["parse_ok_sum"] or 0
                c["correct"] += g["correct_sum"] or 0
                c["tokens"] += g["completion_tokens_sum"] or 0
        by_label = batch.filter(pc.field("parse_ok")).group_by(["perspective", "predicted_label"]).aggregate([([], "count_all")])
        for g in by_label.to_pylist():
            if g["perspective"] in counts and g["predicted_label"] in counts[g["perspective"]]["predicted"]:
                counts[g["perspective"]]["predicted"][g["predicted_label"]] += g["count_all"]
    stats: dict[str, Any] = {"rows": total, "per_perspective": {}, "gold_label_counts": {}}
    for name, c in counts.items():
        n = max(c["rows"], 1)
        stats["per_perspective"][name] = {
            "rows": c["rows"],
            "parse_rate": c["parsed"] / n,
            "accuracy": c["correct"] / n,
            "accuracy_of_parsed": c["correct"] / max(c["parsed"], 1),  # a correct answer is a parsed one
            "predicted_label_counts": c["predicted"],
            "mean_completion_tokens": c["tokens"] / n,
        }
    stats["overall"] = {"parse_rate": parsed / max(total, 1), "accuracy": correct / max(total, 1), "sft_rows": correct}
    stats.update(_agreement(rationales_path, perspectives, labels))
    return stats


def _agreement(rationales_path: str | Path, perspectives: list[str], labels: list[str]) -> dict:
    """Over each pair's first samples: its gold label, pairwise and all-perspective agreement, any/conflicting
    correctness."""
    pairs_of = [(a, b) for i, a in enumerate(perspectives) for b in perspectives[i + 1:]]
    both = dict.fromkeys(pairs_of, 0)
    agree = dict.fromkeys(pairs_of, 0)
    gold = dict.fromkeys(labels, 0)
    n_pairs = full = all_agree = any_correct = conflict = 0
    columns = ["pair_id", "perspective", "sample_idx", "gold_label", "parse_ok", "correct", "predicted_label"]
    for group in pair_groups(rationales_path, columns, keep=pc.field("sample_idx") == 0):
        v = {r["perspective"]: r for r in group}
        n_pairs += 1
        g = next(iter(v.values()))["gold_label"]
        if g in gold:
            gold[g] += 1
        for a, b in pairs_of:
            if a in v and b in v and v[a]["parse_ok"] and v[b]["parse_ok"]:
                both[(a, b)] += 1
                agree[(a, b)] += v[a]["predicted_label"] == v[b]["predicted_label"]
        if len(v) == len(perspectives) and all(r["parse_ok"] for r in v.values()):
            full += 1
            all_agree += len({r["predicted_label"] for r in v.values()}) == 1
        hits = [r["correct"] for r in v.values()]
        any_correct += any(hits)
        conflict += any(hits) and not all(hits)
    return {
        "gold_label_counts": gold,
        "agreement": {
            "pairwise": {f"{a}~{b}": agree[(a, b)] / max(both[(a, b)], 1) for a, b in pairs_of},
            "all_perspectives_agree": all_agree / max(full, 1),
            "pairs_with_any_correct": any_correct / max(n_pairs, 1),
            "pairs_with_conflict": conflict / max(n_pairs, 1),
        },
    }
