"""Conflict samples -> DPO preference pairs (method.md §2).

A pair is a conflict sample when at least one perspective got its label wrong. Each wrong rationale becomes
one preference row: chosen = a correct rationale for the same pair (any perspective, cycling through them, so
cross-perspective pairs arise), rejected = the wrong one. When no perspective was right, the teacher is
resampled up to k times with the perspective-neutral prompt and the first correct sample is kept (pass@k);
if none is correct the pair is skipped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PREFERENCE_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "chosen_perspective", "rejected_perspective", "source")


@dataclass
class ConflictMining:
    rows: list[dict] = field(default_factory=list)  # preference rows, prompt still to be attached
    need_resample: dict[str, list[dict]] = field(default_factory=dict)  # pair_id -> its wrong rationales
    counts: dict[str, int] = field(default_factory=dict)


def _by_pair(rationales: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rationales:
        groups.setdefault(r["pair_id"], []).append(r)
    return groups


def _preferences(pair_id: str, correct: list[dict], wrong: list[dict], source: str) -> list[dict]:
    return [
        {
            "pair_id": pair_id,
            "chosen": correct[i % len(correct)]["completion"],
            "rejected": w["completion"],
            "chosen_perspective": correct[i % len(correct)]["perspective"],
            "rejected_perspective": w["perspective"],
            "source": source,
        }
        for i, w in enumerate(wrong)
    ]


def new_counts() -> dict[str, int]:
    keys = ("pairs", "conflict_pairs", "all_correct", "from_rationales", "need_resample", "rescued_by_resampling",
            "skipped_no_correct", "preference_rows", "cross_perspective_rows")
    return dict.fromkeys(keys, 0)


def mine_pair(pair_id: str, rows: list[dict], counts: dict[str, int]) -> tuple[list[dict], list[dict] | None]:
    """One pair's rationale rows -> its preference rows (prompt still to be attached), and its wrong rationales when
    no perspective was right (it needs resampling; else None). Adds to `counts`.

    Only parsed rationales take part: an unparsed answer has no label to be right or wrong about.
    """
    counts["pairs"] += 1
    parsed = sorted((r for r in rows if r["parse_ok"]), key=lambda r: (r["sample_idx"], r["perspective"]))
    correct = [r for r in parsed if r["correct"]]
    wrong = [r for r in parsed if not r["correct"]]
    if not wrong:
        counts["all_correct"] += bool(correct)
        return [], None
    counts["conflict_pairs"] += 1
    if correct:
        counts["from_rationales"] += 1
        return _preferences(pair_id, correct, wrong, "rationales"), None
    counts["need_resample"] += 1
    return [], wrong


def rescue_pair(pair_id: str, wrong: list[dict], resampled: list[dict], k: int, counts: dict[str, int]) -> list[dict]:
    """pass@k for one pair: the first correct of its first k resamples (by sample_idx) becomes the chosen answer
    against every wrong rationale; with none correct the pair is skipped. Adds to `counts`."""
    tries = sorted(resampled, key=lambda r: r["sample_idx"])[:k]
    first = next((r for r in tries if r["parse_ok"] and r["correct"]), None)
    if first is None:
        counts["skipped_no_correct"] += 1
        return []
    counts["rescued_by_resampling"] += 1
    return _preferences(pair_id, [first], wrong, f"pass@{k}")


def count_rows(counts: dict[str, int], rows: list[dict]) -> None:
    counts["preference_rows"] += len(rows)
    counts["cross_perspective_rows"] += sum(r["chosen_perspective"] != r["rejected_perspective"] for r in rows)


def mine_conflict_pairs(rationales: list[dict]) -> ConflictMining:
    """Rationale rows (as written by the generation stage) -> preference rows + pairs that need resampling."""
    out = ConflictMining(counts=new_counts())
    for pair_id, rows in _by_pair(rationales).items():
        found, wrong = mine_pair(pair_id, rows, out.counts)
        out.rows += found
        if wrong is not None:
            out.need_resample[pair_id] = wrong
    return out


def add_resampled(mining: ConflictMining, resampled: list[dict], k: int) -> ConflictMining:
    """pass@k (`rescue_pair`) for every pair that needed it; then the row counts."""
    samples = _by_pair(resampled)
    counts = dict(mining.counts)
    rows = list(mining.rows)
    for pair_id, wrong in mining.need_resample.items():
        rows += rescue_pair(pair_id, wrong, samples.get(pair_id, []), k, counts)
    count_rows(counts, rows)
    return ConflictMining(rows=rows, need_resample={}, counts=counts)


class PreferenceDataError(ValueError):
    pass


def preference_problems(rows: list[dict], where: str = "DPO table", start: int = 0) -> list[str]:
    """What is wrong with each row (numbered from `start`): every row needs a non-empty prompt, chosen and
    rejected, and chosen != rejected."""
    errors = []
    for i, r in enumerate(rows, start):
        for col in ("prompt", "chosen", "rejected"):
            value = r.get(col)
            text = value if isinstance(value, str) else "".join(m.get("content", "") for m in value or [])
            if not text.strip():
                errors.append(f"{where} row {i} (pair {r.get('pair_id')!r}): empty {col}")
        if r.get("chosen") and r.get("chosen") == r.get("rejected"):
            errors.append(f"{where} row {i} (pair {r.get('pair_id')!r}): chosen and rejected are identical")
    return errors


def raise_preference_problems(errors: list[str], n_errors: int, n_rows: int, where: str = "DPO table") -> None:
    """`errors`: the first problems found (20 are shown), of `n_errors` in all, over a table of `n_rows` rows."""
    if not n_rows:
        errors, n_errors = [*errors, f"{where}: no preference pairs; the teacher had no conflict samples (every "
                                     "perspective agreed with gold or none parsed)"], n_errors + 1
    if n_errors:
        shown = "\n".join(errors[:20]) + (f"\n... and {n_errors - 20} more" if n_errors > 20 else "")
        raise PreferenceDataError(f"{n_errors} problem(s):\n{shown}\nFix or drop these rows before DPO.")


def validate_preferences(rows: list[dict], where: str = "DPO table") -> None:
    errors = preference_problems(rows, where)
    raise_preference_problems(errors, len(errors), len(rows), where)
