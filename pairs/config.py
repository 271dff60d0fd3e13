"""The `data` section of a run config: which file holds the labelled pairs, which columns hold each field, the
files joined to it, and how it is split."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnMap(_Strict):
    """Which column of the input file holds each field. Optional fields may be null."""

    query: str = "query"
    title: str = "product_title"
    label: str = "label"
    pair_id: str | None = "pair_id"
    query_id: str | None = "query_id"
    product_id: str | None = "product_id"
    # attribute name (as shown in prompts) -> column; missing columns are simply absent attributes
    attributes: dict[str, str] = Field(
        default_factory=lambda: {
            "brand": "product_brand",
            "color": "product_color",
            "description": "product_description",
            "bullet_points": "product_bullet_point",
        }
    )


class SplitConfig(_Strict):
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    # a column of the pairs file that decides the test split (ESCI's `split`): its rows equal to `test_value` are
    # the test split; train and val are drawn by query from the other rows (train + val = 1, test = 0)
    column: str | None = None
    test_value: str = "test"

    @model_validator(mode="before")
    @classmethod
    def _column_defaults(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("column"):
            raw = {"test": 0.0, **({"train": 0.9, "val": 0.1} if not {"train", "val"} & raw.keys() else {}), **raw}
        return raw

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if any(f < 0 for f in (self.train, self.val, self.test)) or abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be non-negative and sum to 1, got {total:g}")
        if self.column and self.test:
            raise ValueError(f"with a split column the test split is the rows whose {self.column!r} is "
                             f"{self.test_value!r}: set test to 0 and train + val to 1 (e.g. train 0.9, val 0.1)")
        return self

    @model_serializer(mode="wrap")
    def _stable(self, handler) -> dict:
        return drop_defaults(handler(self), {} if self.column else {"column": None, "test_value": "test"})


class JoinedFile(_Strict):
    """A file joined to the pairs file: a pair takes the columns of the row whose `on` columns equal its own."""

    path: str
    on: list[str] = Field(min_length=1)  # key column(s), named alike in both files; compared as text
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, raw: Any) -> Any:
        # YAML 1.1 reads an unquoted `on:` key as the boolean true
        if isinstance(raw, dict) and True in raw:
            raw = dict(raw)
            value = raw.pop(True)
            raw.setdefault("on", value)
        return raw

    @field_validator("on", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


FilterValue = str | int | float | bool


class DataConfig(_Strict):
    path: str  # the labelled pairs; with `products`/`queries`, the file of judgements that names them
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"
    columns: ColumnMap = Field(default_factory=ColumnMap)
    split: SplitConfig = Field(default_factory=SplitConfig)
    products: JoinedFile | None = None  # e.g. ESCI's products parquet, on [product_id, product_locale]
    queries: JoinedFile | None = None  # e.g. WANDS' query.csv, on query_id
    # keep only the pairs whose column (of the pairs file) holds this value or one of these (as text, any case)
    filter: dict[str, FilterValue | list[FilterValue]] = Field(default_factory=dict)
    # a pair whose product or query the joined file lacks: `error` (their count and the first ones) or `drop`
    # (left out and counted in the prepare manifest)
    missing: Literal["error", "drop"] = "error"

    @model_serializer(mode="wrap")
    def _stable(self, handler) -> dict:
        return drop_defaults(handler(self), {"products": None, "queries": None, "filter": {}, "missing": "error"})


def drop_defaults(dumped: dict, defaults: dict) -> dict:
    """Keys added after runs were made stay out of the dump (a stage's cache key) while they hold their default:
    adding them made no finished stage stale."""
    return {k: v for k, v in dumped.items() if k not in defaults or v != defaults[k]}
