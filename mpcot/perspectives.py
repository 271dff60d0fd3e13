"""Perspectives are data: a name, an instruction, and optional few-shot examples.

Users add their own in YAML (`extra_perspectives:` or a full `perspectives:` list) without touching code.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FewShotExample(BaseModel):
    """A worked judgement shown to the teacher before the real pair. `label` is a label code or title."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query: str
    title: str
    attributes: dict[str, str] = Field(default_factory=dict)
    rationale: str
    label: str


class Perspective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    instruction: str = Field(min_length=1)
    examples: list[FewShotExample] = Field(default_factory=list)


DEFAULT_PERSPECTIVES = [
    {
        "name": "user_intent",
        "instruction": (
            "Judge from the shopper's point of view. Work out what the shopper wants: the product type, the "
            "need behind the query and the usage scenario. Then decide whether this product serves that need. "
            "Watch for category mismatch: a product from a different category than the one asked for."
        ),
    },
    {
        "name": "structured_analysis",
        "instruction": (
            "Compare the query and the product attribute by attribute: category, brand, model or series, "
            "size, quantity, and any specification the query names. Say which attributes match, which conflict "
            "and which are unknown. Watch for model mismatch: the right kind of product but the wrong model or spec."
        ),
    },
    {
        "name": "business_rules",
        "instruction": (
            "Apply the platform's relevance rules. An accessory or part for X is not X (it is a complement). "
            "A product that could be used instead of the one asked for, but misses a stated requirement, is a "
            "substitute. A brand named in the query is a hard constraint. Watch for accessory mismatch."
        ),
    },
]

# The DPO prompt is perspective-neutral so that cross-perspective (chosen, rejected) pairs share one prompt.
NEUTRAL_PERSPECTIVE = Perspective(
    name="neutral",
    instruction=(
        "Analyse the pair from whichever perspective fits best: the shopper's intent, an attribute-by-attribute "
        "comparison, or the platform's relevance rules."
    ),
)
