"""The request and response bodies of POST /v1/relevance, with the limits that keep one request from stalling the
ingress: the item count, each text field's length, the attributes per item and their names' length are checked
while the body is validated, before any item is built. No Ray import.

The limits come from the `serve:` settings; one ingress replica runs per process, so they are set once per process
(`set_limits`, by the ingress at start). The body's size is capped before any of this runs (serve/http.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

KNOWN = ("brand", "color", "description", "bullet_points")  # attributes with a field of their own
TOO_MANY_ITEMS = "too_many_items"  # the error type the ingress answers with 413 rather than 422


@dataclass(frozen=True)
class Limits:
    max_items: int = 100
    max_field_chars: int = 4000
    max_attributes: int = 32
    max_key_chars: int = 64


_limits = [Limits()]


def set_limits(settings) -> Limits:
    """Take the limits from a ServeConfig (the ingress calls this at start)."""
    _limits[0] = Limits(settings.max_items, settings.max_field_chars, settings.max_attributes, settings.max_key_chars)
    return _limits[0]


def limits() -> Limits:
    return _limits[0]


def _short(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "...")


class Item(BaseModel):
    """One product. Known attributes are named; any other string field is passed on as an attribute."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    brand: str | None = None
    color: str | None = None
    description: str | None = None
    bullet_points: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data):
        """Counts and lengths on the raw object, before any field is validated or copied."""
        if not isinstance(data, dict):
            return data
        lim = limits()
        attrs = [k for k in data if k not in ("id", "title")]
        if len(attrs) > lim.max_attributes:
            raise ValueError(f"{len(attrs)} attributes; the limit is {lim.max_attributes} (serve.max_attributes)")
        for k in attrs:
            if len(k) > lim.max_key_chars:
                raise ValueError(f"attribute name {_short(k)} has {len(k)} characters; the limit is "
                                 f"{lim.max_key_chars} (serve.max_key_chars)")
        for k, v in data.items():
            if isinstance(v, str) and len(v) > lim.max_field_chars:
                raise ValueError(f"item {_short(str(data.get('id')))}: field {_short(k)} has {len(v)} characters; "
                                 f"the limit is {lim.max_field_chars} (serve.max_field_chars)")
        bad = [k for k in attrs if k not in KNOWN and not isinstance(data[k], str)]
        if bad:
            raise ValueError(f"item {_short(str(data.get('id')))}: attribute(s) {bad[:5]} must be strings")
        return data

    @field_validator("title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("title must not be blank")
        return v

    def attributes(self) -> dict[str, str]:
        known = {k: getattr(self, k) for k in KNOWN}
        return {k: v for k, v in {**known, **(self.model_extra or {})}.items() if v}


class RelevanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    items: list[Item] = Field(min_length=1)

    @field_validator("query")
    @classmethod
    def _query_length(cls, v: str) -> str:
        lim = limits()
        if len(v) > lim.max_field_chars:
            raise ValueError(f"the query has {len(v)} characters; the limit is {lim.max_field_chars} "
                             "(serve.max_field_chars)")
        return v

    @field_validator("items", mode="before")
    @classmethod
    def _item_count(cls, v):
        lim = limits()
        if isinstance(v, list) and len(v) > lim.max_items:  # before a single item is validated
            raise PydanticCustomError(TOO_MANY_ITEMS, "{n} items in one request; the limit is {limit} (serve.max_items)",
                                      {"n": len(v), "limit": lim.max_items})
        return v


class ItemResult(BaseModel):
    id: str
    label: str
    probabilities: dict[str, float]
    score: float = Field(description="expected relevance in [0, 1]: labels weighted from the best (1) to the worst (0)")
    dominant_perspective: str | None
    truncated: bool = Field(description="query + product text was longer than the model's max length and was cut")


class RelevanceResponse(BaseModel):
    model: str = Field(description="the student's folder name (its parent and itself), never a path on the server")
    model_digest: str = Field(description="sha256 of the student's config and weights (as in GET /v1/model)")
    results: list[ItemResult]


class Refusal(BaseModel):
    error: str
    reason: str = Field(description="latency_budget | deadline | queue_full | unavailable | shutting_down")
    retry_after_s: float


class Problem(BaseModel):
    error: str
    problems: list[str] | None = None
