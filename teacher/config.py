"""Config of teacher training: one dataclass per trainer (SFT, DPO) plus the shared distributed settings."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DistributedSettings(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each; one GPU each on GPUs)")
    zero_stage: Literal[0, 2, 3] = 2
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    cpus_per_worker: int = Field(1, ge=1)
    bf16: Literal["auto", "on", "off"] = "auto"  # auto: on where the GPUs support it or the CPU has native bf16
    offload: bool = Field(False, description="ZeRO optimizer/param offload to CPU memory (GPU clusters)")


class _TrainCommon(_Strict):
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(2e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps; -1 = run the epochs")
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16, description="prompt + completion tokens; longer rows are truncated")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, ~30% slower")
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    save_total_limit: int = Field(2, ge=1)
    seed: int = 0


class SFTConfig(_TrainCommon):
    """Supervised fine-tuning on consistency-filtered rationales, loss on the completion only."""

    balance: Literal["none", "cap", "upsample"] = Field(
        "none", description="cap: at most cap_per_label rows per label; upsample: repeat rare labels up to the largest"
    )
    cap_per_label: int | None = Field(None, ge=1)


class DPOConfig(_TrainCommon):
    """Preference optimisation on conflict samples, starting from the SFT export."""

    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"
    pass_k: int = Field(5, ge=0, description="resample the teacher up to k times for pairs no perspective got right")
    resample_temperature: float = Field(0.8, gt=0)


class TeacherEvalConfig(_Strict):
    """Base vs SFT vs SFT+DPO on the test split through the generation stage (greedy)."""

    enabled: bool = True
    split: Literal["train", "val", "test"] = "test"
    max_pairs: int | None = Field(None, ge=1)
