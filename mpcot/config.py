"""The `generation:` section of a run config: how the teacher is sampled."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerationConfig(BaseModel):
    """Everything about how the teacher is sampled. Lives in the `generation:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    # json: {"rationale", "label"} constrained by vLLM structured outputs, the label one of the label titles
    # choice: free rationale text, then a guided choice among the label titles after "Label: "
    # free_text: unconstrained; the label is parsed from a final "Label: X" line
    output_mode: Literal["json", "choice", "free_text"] = "json"
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])
    max_pairs: int | None = Field(None, ge=1, description="first N pairs of each split, null = all")
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, description="json mode: leave room for rationale_max_chars, or long answers are cut and fail to parse")
    repetition_penalty: float = Field(1.0, gt=0.0, description=">1 discourages the loops small greedy models fall into")
    rationale_max_chars: int = Field(400, ge=1, description="json mode: longest rationale allowed")
    max_attribute_chars: int = Field(300, ge=0, description="attribute text is cut to this length in prompts")
    batch_size: int = Field(32, ge=1, description="prompts per vLLM call; one Parquet part per batch")
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas (Ray actors)")
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    cpus_per_engine: int | None = Field(None, ge=1, description="CPU mode; null = the cluster's CPUs / concurrency")
    gpus_per_engine: int = Field(1, ge=1, description="GPU mode: tensor-parallel size of each engine")
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM(...) keyword arguments")
