"""Settings of the Serve application (the `serve:` section of a run config); no Ray import."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """The `serve:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"  # bind to loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(64, ge=1, description="items scored together across concurrent requests")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    # Ray Serve's default (5 requests) starves the batcher: the router holds the rest back and retries with backoff
    # up to 0.5 s, so a replica under 32 clients sat half idle (145 items/s against 390 in-process, measured)
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests a replica holds at once; "
                                             "default 2 x max_batch_size, so the next batch is queued while one runs")
    access_log: bool = Field(True, description="one log line per request from the replica (Ray Serve's access log)")
    max_items: int = Field(100, ge=1, description="items per request; more -> 413")
    max_field_chars: int = Field(4000, ge=1, description="characters per text field; more -> 422")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    # auto: the fastest path whose parity check passed on this machine (serve/scorer.py resolve_path)
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"

    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size
