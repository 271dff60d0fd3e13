import pytest

from mpcot.conflicts import PreferenceDataError, add_resampled, mine_conflict_pairs, validate_preferences


def row(pair, persp, label, gold, sample=0, parse_ok=True):
    return {
        "pair_id": pair, "perspective": persp, "sample_idx": sample, "parse_ok": parse_ok,
        "correct": parse_ok and label == gold, "predicted_label": label if parse_ok else None,
        "completion": f"{persp}/{sample} says {label}" if parse_ok else None,
    }


def test_cross_perspective_pairs_from_a_conflict_sample():
    rows = [row("a", "user_intent", "E", "E"), row("a", "structured_analysis", "S", "E"), row("a", "business_rules", "I", "E")]
    m = mine_conflict_pairs(rows)
    assert m.counts["conflict_pairs"] == 1 and not m.need_resample
    assert [(r["chosen_perspective"], r["rejected_perspective"]) for r in m.rows] == [
        ("user_intent", "business_rules"), ("user_intent", "structured_analysis")]
    assert all(r["chosen"] == "user_intent/0 says E" for r in m.rows)


def test_all_correct_pair_gives_nothing_and_parse_failures_do_not_count_as_wrong():
    rows = [row("a", p, "E", "E") for p in ("u", "s")] + [row("a", "b", None, "E", parse_ok=False)]
    m = mine_conflict_pairs(rows)
    assert m.rows == [] and m.counts["all_correct"] == 1 and m.counts["conflict_pairs"] == 0


def test_chosen_cycles_through_correct_rationales():
    rows = [row("a", "u", "E", "E"), row("a", "s", "E", "E"), row("a", "b", "I", "E"), row("a", "x", "S", "E")]
    chosen = [r["chosen_perspective"] for r in mine_conflict_pairs(rows).rows]
    assert sorted(chosen) == ["s", "u"]


def test_pass_at_k_keeps_first_correct_resample():
    rows = [row("a", "u", "S", "E"), row("a", "s", "I", "E")]
    m = mine_conflict_pairs(rows)
    assert list(m.need_resample) == ["a"] and m.rows == []
    resampled = [row("a", "neutral", "S", "E", sample=0), row("a", "neutral", "E", "E", sample=2),
                 row("a", "neutral", "E", "E", sample=1)]
    done = add_resampled(m, resampled, k=5)
    assert done.counts["rescued_by_resampling"] == 1 and done.counts["skipped_no_correct"] == 0
    assert {r["chosen"] for r in done.rows} == {"neutral/1 says E"}
    assert {r["source"] for r in done.rows} == {"pass@5"} and len(done.rows) == 2


def test_pass_at_k_skips_and_counts_when_no_sample_is_correct():
    m = mine_conflict_pairs([row("a", "u", "S", "E"), row("b", "u", "E", "E"), row("b", "s", "I", "E")])
    late_only = [row("a", "neutral", "S", "E", sample=i) for i in range(3)] + [row("a", "neutral", "E", "E", sample=3)]
    done = add_resampled(m, late_only, k=3)  # the correct one is the 4th sample: beyond k
    assert done.counts["skipped_no_correct"] == 1 and done.counts["rescued_by_resampling"] == 0
    assert {r["pair_id"] for r in done.rows} == {"b"}
    assert done.counts["preference_rows"] == 1 and done.counts["cross_perspective_rows"] == 1


def test_validate_preferences_names_the_row():
    ok = {"pair_id": "a", "prompt": [{"role": "user", "content": "q"}], "chosen": "x", "rejected": "y"}
    validate_preferences([ok])
    with pytest.raises(PreferenceDataError, match=r"row 1 \(pair 'b'\): chosen and rejected are identical"):
        validate_preferences([ok, dict(ok, pair_id="b", rejected="x")])
    with pytest.raises(PreferenceDataError, match=r"row 0 \(pair 'a'\): empty prompt"):
        validate_preferences([dict(ok, prompt=[{"role": "user", "content": " "}])])
    with pytest.raises(PreferenceDataError, match="no preference pairs"):
        validate_preferences([])


def test_teacher_scores_count_unparsed_as_wrong():
    from teacher.evaluate import score_judgements

    rows = [
        {"perspective": "u", "gold_label": "E", "predicted_label": "E"},
        {"perspective": "u", "gold_label": "I", "predicted_label": None},
        {"perspective": "s", "gold_label": "E", "predicted_label": "S"},
        {"perspective": "s", "gold_label": "I", "predicted_label": "I"},
    ]
    s = score_judgements(rows, ["E", "S", "C", "I"])
    assert s["u"]["accuracy"] == 0.5 and s["u"]["parse_rate"] == 0.5
    assert s["all"]["accuracy"] == 0.5 and s["all"]["n"] == 4
    # per-class F1 over the label set: E 2/3, S 0, C 0 (no support, no predictions), I 2/3
    assert s["all"]["macro_f1"] == pytest.approx((2 / 3 + 0 + 0 + 2 / 3) / 4)


def test_teacher_scores_are_scikit_learns_counted_in_batches():
    import random

    from sklearn.metrics import accuracy_score, f1_score

    from teacher.evaluate import score, score_judgements

    rng = random.Random(0)
    codes = ["E", "S", "C", "I"]
    for _ in range(100):
        n = rng.randint(1, 40)
        gold = [rng.choice(codes[: rng.randint(1, 4)]) for _ in range(n)]
        pred = [rng.choice([*codes, None]) for _ in range(n)]
        shown = [p if p is not None else "<unparsed>" for p in pred]
        s = score(gold, pred, codes)
        assert s["accuracy"] == accuracy_score(gold, shown)
        assert s["macro_f1"] == pytest.approx(f1_score(gold, shown, labels=codes, average="macro", zero_division=0), abs=1e-12)
    rows = [{"perspective": rng.choice("uv"), "gold_label": rng.choice(codes), "predicted_label": rng.choice(codes)} for _ in range(50)]
    batched = score_judgements(iter(rows), codes)  # an iterator over a dataset's batches is read once
    assert batched["all"] == score([r["gold_label"] for r in rows], [r["predicted_label"] for r in rows], codes)
    assert batched["u"]["n"] + batched["v"]["n"] == 50
