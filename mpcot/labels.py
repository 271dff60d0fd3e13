"""The ordered label set a relevance judgement chooses from (default: ESCI)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ESCI_LABELS = [
    {"name": "E", "title": "Exact", "description": "the product is relevant for the query and satisfies all its specifications", "gain": 1.0},
    {"name": "S", "title": "Substitute", "description": "the product is somewhat relevant: it fails some aspects of the query but could be used in its place", "gain": 0.1},
    {"name": "C", "title": "Complement", "description": "the product does not fulfil the query but could be used together with an exact item (e.g. an accessory)", "gain": 0.01},
    {"name": "I", "title": "Irrelevant", "description": "the product is irrelevant for the query or fails a central aspect of it", "gain": 0.0},
]  # gains: the ESCI paper's nDCG gains (Reddy et al., 2022)


class Label(BaseModel):
    """One grade. `name` is the code stored in data (e.g. "E"); `title` is the word the teacher writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    title: str = Field(min_length=1)
    description: str = ""
    # the label's gain in nDCG (ranking metrics only; null = its linear grade, best 1 to worst 0). Left out of dumps,
    # so it never changes a prompt or a stage's cache key
    gain: float | None = Field(None, ge=0, exclude=True)


def label_names(labels: list[Label]) -> list[str]:
    return [lab.name for lab in labels]


def label_lookup(labels: list[Label]) -> dict[str, str]:
    """Every accepted spelling (code or title, lower-cased) -> the label code."""
    table: dict[str, str] = {}
    for lab in labels:
        table[lab.name.lower()] = lab.name
        table[lab.title.lower()] = lab.name
    return table
