import pytest

from mpcot.parsing import parse_free_text, parse_json, parse_output
from mpcot.prompts import format_completion


@pytest.mark.parametrize(
    "text,code",
    [
        ("The fan matches.\nLabel: Exact", "E"),
        ("reasoning\nlabel: e", "E"),
        ("reasoning\nLABEL: Substitute.", "S"),
        ("reasoning\n**Label:** Complement", "C"),
        ("reasoning\nLabel - irrelevant!", "I"),
        ("reasoning\nLabel: 'I'", "I"),
        ("Label: Exact\nmore thoughts\nLabel: Irrelevant", "I"),  # the last label line wins
    ],
)
def test_free_text_accepts_names_codes_case_and_punctuation(labels, text, code):
    parsed = parse_free_text(text, labels)
    assert parsed.ok and parsed.label == code
    assert "Label" not in parsed.rationale.splitlines()[-1] if parsed.rationale else True


def test_free_text_keeps_rationale_before_label(labels):
    parsed = parse_free_text("Same brand and model.\nIt fits.\nLabel: Exact", labels)
    assert parsed.rationale == "Same brand and model.\nIt fits."


@pytest.mark.parametrize(
    "text,error",
    [("It is a fan.", "no 'Label:' line"), ("Label: Maybe", "unknown label 'Maybe'"), ("", "no 'Label:' line")],
)
def test_free_text_failures_are_reported_not_raised(labels, text, error):
    parsed = parse_free_text(text, labels)
    assert not parsed.ok and parsed.label is None
    assert parsed.error == error


def test_json_round_trip_with_format_completion(labels):
    text = format_completion("Brand and size match.", "Substitute", "json")
    parsed = parse_json(text, labels)
    assert (parsed.ok, parsed.label, parsed.rationale) == (True, "S", "Brand and size match.")


@pytest.mark.parametrize(
    "text,error",
    [
        ('{"rationale": "cut off', "no JSON object"),
        ('{"rationale": "x", "label": "Great"}', "unknown label 'Great'"),
        ('{"rationale": "x"}', "missing 'label'"),
        ("{not json}", "invalid JSON"),
    ],
)
def test_json_failures_are_reported(labels, text, error):
    parsed = parse_json(text, labels)
    assert not parsed.ok
    assert parsed.error.startswith(error)


def test_parse_output_dispatches_on_mode(labels):
    assert parse_output("x\nLabel: C", labels, "choice").label == "C"
    assert parse_output('{"rationale": "x", "label": "C"}', labels, "json").label == "C"
