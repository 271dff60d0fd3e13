"""Reading the teacher's answers back into (rationale, label). Failures are reported, never raised."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mpcot.labels import Label, label_lookup

_LABEL_LINE = re.compile(r"^\W*label\W*[:：=\-]\s*(.+?)\s*$", re.IGNORECASE)
_STRIP = " \t\"'`*_.,;:!()[]{}<>"


@dataclass(frozen=True)
class ParsedJudgement:
    rationale: str
    label: str | None  # a label code, or None when parsing failed
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.label is not None


def normalise_label(text: str, labels: list[Label]) -> str | None:
    """'exact.', '**E**', ' Irrelevant ' -> the label code; anything else -> None."""
    return label_lookup(labels).get(text.strip(_STRIP).lower())


def parse_free_text(text: str, labels: list[Label]) -> ParsedJudgement:
    """The last line of the form `Label: X` (any case, markdown or trailing punctuation allowed)."""
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _LABEL_LINE.match(lines[i])
        if m:
            code = normalise_label(m.group(1), labels)
            rationale = "\n".join(lines[:i]).strip()
            if code is None:
                return ParsedJudgement(rationale, None, f"unknown label {m.group(1)!r}")
            return ParsedJudgement(rationale, code)
    return ParsedJudgement(text.strip(), None, "no 'Label:' line")


def parse_json(text: str, labels: list[Label]) -> ParsedJudgement:
    """A JSON object with `rationale` and `label`; tolerates text around the object."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return ParsedJudgement(text.strip(), None, "no JSON object")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        return ParsedJudgement(text.strip(), None, f"invalid JSON: {exc.msg}")
    if not isinstance(obj, dict):
        return ParsedJudgement(text.strip(), None, "JSON is not an object")
    rationale = str(obj.get("rationale", "")).strip()
    raw_label = obj.get("label")
    if not isinstance(raw_label, str):
        return ParsedJudgement(rationale, None, "missing 'label'")
    code = normalise_label(raw_label, labels)
    if code is None:
        return ParsedJudgement(rationale, None, f"unknown label {raw_label!r}")
    return ParsedJudgement(rationale, code)


def parse_output(text: str, labels: list[Label], output_mode: str) -> ParsedJudgement:
    if output_mode == "json":
        return parse_json(text, labels)
    return parse_free_text(text, labels)
