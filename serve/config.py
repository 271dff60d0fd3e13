"""Settings of the Serve application (the `serve:` section of a run config); no Ray import."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Autoscaling(BaseModel):
    """`serve.autoscaling`: passed to Ray Serve's `autoscaling_config` of the model deployment."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    # demand: each replica reports the forward-thread seconds per second it was busy plus those its refusals would
    # have needed (serve/autoscale.py); ongoing_requests: Ray Serve's default, which cannot see refused load
    metric: Literal["demand", "ongoing_requests"] = "demand"
    target_utilisation: float = Field(0.7, gt=0, le=1, description="demand per replica to aim for (metric demand)")
    # a replica's batches are full at about 128 items in flight (two 64-item batches): 8 requests of 16 items
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica to aim for (metric ongoing_requests)")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(10.0, gt=0, description="window the replicas' reports are averaged over")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report")

    @model_validator(mode="after")
    def _ordered(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self

    def ray_config(self) -> dict:
        """Ray Serve's autoscaling_config."""
        out = self.model_dump(exclude={"metric", "target_utilisation"})
        if self.metric == "demand":
            out["policy"] = {"policy_function": "serve.autoscale:DemandPolicy",
                             "policy_kwargs": {"target_utilisation": self.target_utilisation}}
        return out


class ServeConfig(BaseModel):
    """The `serve:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"  # bind to loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1, description="model replicas (ignored when serve.autoscaling is set)")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(64, ge=1, description="items scored together across concurrent requests")
    # an idle model starts a forward at once: under load the next batch gathers while one runs (serve/batching.py)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long an idle model waits for a batch to fill")
    # Ray Serve's default (5 requests) starves the batcher: the router holds the rest back and retries with backoff
    # up to 0.5 s, so a replica under 32 clients sat half idle (145 items/s against 390 in-process, measured)
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests a replica holds at once; "
                                             "default 2 x max_batch_size, so the next batch is queued while one runs")
    latency_budget_ms: float | None = Field(500.0, gt=0, description="a request whose items would be scored later "
                                            "than this is refused at once (503 + Retry-After); null: never refused")
    max_queued_requests: int | None = Field(None, ge=1, description="requests waiting for a free replica (Ray Serve's "
                                            "per-caller queue); more are refused at once; default max_ongoing_requests")
    overload_status: Literal[503, 429] = Field(503, description="status of a refusal for overload (both with Retry-After)")
    request_timeout_s: float | None = Field(None, gt=0, description="the HTTP proxy gives up on a request after this "
                                            "(408); default 4 x the latency budget, at least 2 s")
    health_check_period_s: float = Field(5.0, gt=0, description="seconds between a replica's health checks (one tiny forward)")
    health_check_timeout_s: float = Field(10.0, gt=0, description="a health check slower than this restarts the replica")
    max_surge_percent: int = Field(100, ge=0, le=100, description="extra replicas started before old ones stop on a "
                                   "redeploy (needs spare CPUs; 0 stops old replicas first)")
    surge_timeout_s: float = Field(300.0, gt=0, description="a redeploy whose surge replicas have not started by "
                                   "then replaces the replicas one after another instead")
    api_key_env: str | None = Field(None, min_length=1, description="name of an environment variable holding an API "
                                    "key: /v1/* then needs `Authorization: Bearer <key>`")
    access_log: bool = Field(True, description="one log line per request from the replica (Ray Serve's access log)")
    max_items: int = Field(100, ge=1, description="items per request; more -> 413")
    max_field_chars: int = Field(4000, ge=1, description="characters per text field; more -> 422")
    max_attributes: int = Field(32, ge=0, description="attributes per item besides id and title; more -> 422")
    max_key_chars: int = Field(64, ge=1, description="characters per attribute name; more -> 422")
    # 100 items of 4000-character fields fit; a larger body is refused (413) before it is parsed: on Content-Length,
    # or once the streamed body passes the limit
    max_body_bytes: int = Field(1 << 20, ge=1024, description="bytes per request body; more -> 413 before parsing")
    graceful_shutdown_s: float = Field(20.0, gt=0, description="on SIGTERM (or a redeploy), how long replicas may "
                                       "take to finish the requests they hold before they are stopped")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    # auto: the fastest path whose parity check passed on this machine (serve/scorer.py resolve_path)
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"

    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def queued_requests(self) -> int:
        return self.max_queued_requests or self.ongoing_requests()

    def timeout_s(self) -> float | None:
        """http_options.request_timeout_s: the given one, else from the latency budget (None: no budget, no timeout)."""
        if self.request_timeout_s is not None:
            return self.request_timeout_s
        return None if self.latency_budget_ms is None else max(2.0, math.ceil(4 * self.latency_budget_ms) / 1000)

    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas
