"""The student on Ray Serve: encoder -> latent reasoning extractor -> classifier, no text generation.

  POST /v1/relevance  {query, items: [{id, title, brand?, color?, description?, bullet_points?, <other>?}]}
                      -> per item: label, probabilities per label, expected-relevance score, dominant perspective
  GET  /healthz       GET /v1/model       (OpenAPI docs at /docs)

Two deployments. `RelevanceService` (the HTTP ingress, no CPU reserved) checks the key, parses and validates, and
calls `StudentModel` (the replicas holding the student), retrying a request whose replica died before answering.
Each `StudentModel` replica scores the items of concurrent requests together (serve/batching.py) on the path that
`serve.backend` / `serve.precision` pick, and refuses at once a request it could not finish within
`serve.latency_budget_ms`. Bad requests get a 4xx with a message; a refusal for overload gets 503 (or 429) with
`Retry-After` and a JSON body saying why.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import statistics
import time
from collections import deque
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve.batching import Batcher
from serve.config import ServeConfig
from serve.scorer import StudentScorer

# a replica queues work for this share of the latency budget, leaving the rest for HTTP, parsing and the hops (a
# choice, not fitted; on 2 shared cores under 4x overload those took more: README, "Serving under load and faults")
QUEUE_SHARE = 0.75
PROBE = ("usb c cable", "Anker USB-C to USB-C cable 2 m | color: black")  # the health check's tiny forward


class Item(BaseModel):
    """One product. Known attributes are named; any other string field is passed on as an attribute."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    brand: str | None = None
    color: str | None = None
    description: str | None = None
    bullet_points: str | None = None

    @field_validator("title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("title must not be blank")
        return v

    def attributes(self) -> dict[str, str]:
        known = {k: getattr(self, k) for k in ("brand", "color", "description", "bullet_points")}
        extra = dict(self.model_extra or {})
        bad = [k for k, v in extra.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"item {self.id!r}: attribute(s) {bad} must be strings")
        return {k: v for k, v in {**known, **extra}.items() if v}


class RelevanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    items: list[Item] = Field(min_length=1)


class ItemResult(BaseModel):
    id: str
    label: str
    probabilities: dict[str, float]
    score: float = Field(description="expected relevance in [0, 1]: labels weighted from the best (1) to the worst (0)")
    dominant_perspective: str | None
    truncated: bool = Field(description="query + product text was longer than the model's max length and was cut")


class RelevanceResponse(BaseModel):
    model: str
    model_digest: str = Field(description="sha256 of the student's config and weights (as in GET /v1/model)")
    results: list[ItemResult]


class Refusal(BaseModel):
    error: str
    reason: str = Field(description="latency_budget | queue_full | unavailable")
    retry_after_s: float


app = FastAPI(title="thinkbroad relevance", description=__doc__)


class _Gate:
    """ASGI middleware: stamps when a request reached the ingress (for the per-phase timing) and, with an API key
    set, answers 401 to /v1/* without `Authorization: Bearer <key>` before the body is read."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("state", {})["t0"] = time.perf_counter()
            key = getattr(scope["app"].state, "api_key", None)
            path = scope["path"].removeprefix(scope.get("root_path", ""))  # under a route prefix, too
            if key is not None and path.startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, b"Bearer " + key):  # constant time: the key does not leak by timing
                    reply = JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"}, content={
                        "error": "missing or wrong API key: send the header `Authorization: Bearer <key>`"})
                    return await reply(scope, receive, send)
        await self.inner(scope, receive, send)


app.add_middleware(_Gate)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        problems.append(f"{where}: {err['msg']}")
    return JSONResponse(status_code=422, content={"error": "invalid request", "problems": problems})


class HTTPError(Exception):
    def __init__(self, status: int, message: str, **extra):
        self.status, self.message, self.extra = status, message, extra


@app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError):
    retry = exc.extra.get("retry_after_s")
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
    return JSONResponse(status_code=exc.status, content={"error": exc.message, **exc.extra}, headers=headers)


@serve.deployment
class StudentModel:
    """One replica of the student. `score` refuses (returns {"refused": ...}) a request whose items would be scored
    later than the latency budget allows, unless nothing is queued: a request that can start at once is served."""

    def __init__(self, student_dir: str, settings: dict):
        s = ServeConfig(**settings)
        self.scorer = StudentScorer(student_dir, s.device, s.backend, s.precision)
        self.batcher = Batcher(self.scorer.score, s.max_batch_size, s.batch_wait_timeout_s, self._profile(s.max_batch_size))
        self.budget_ms = s.latency_budget_ms
        self.replica = serve.get_replica_context().replica_id.unique_id

    def _profile(self, batch: int) -> tuple[float, float]:
        """Seconds per forward and per item: forwards of 1 and of min(batch, 16) pairs as long as the model takes,
        each timed after a first run (which builds the kernels for its shape), the faster of two runs. Small, so a
        replica starting beside a serving one (a redeploy) takes little of its CPU."""
        long = (PROBE[0], " | ".join([PROBE[1]] * 16))  # cut to the model's max length: the costliest item
        batch = max(2, min(batch, 16))
        times = {}
        for n in (1, batch):
            self.scorer.score([long] * n)
            runs = []
            for _ in range(2):
                t = time.perf_counter()
                self.scorer.score([long] * n)
                runs.append(time.perf_counter() - t)
            times[n] = min(runs)
        per_item = max(0.0, (times[batch] - times[1]) / max(1, batch - 1))
        return max(0.0, times[1] - per_item), per_item

    async def score(self, pairs: list[tuple[str, str]]) -> dict:
        b = self.batcher
        if self.budget_ms is not None and b.over_budget(len(pairs), QUEUE_SHARE * self.budget_ms / 1000):
            drain = b.expected_s(0)
            return {"refused": {
                "reason": "latency_budget", "retry_after_s": round(drain, 3),
                "error": f"overloaded: {b.queued} items are queued on this replica; {len(pairs)} more would be "
                         f"scored in about {1000 * b.expected_s(len(pairs)):.0f} ms, over the latency budget of "
                         f"{self.budget_ms:g} ms (serve.latency_budget_ms). Retry after a backoff, or fall back"}}
        results, timing = await b.submit(pairs)
        return {"results": results, "timing": timing, "model": self.scorer.name, "digest": self.scorer.digest}

    async def check_health(self) -> None:
        """Ray Serve calls this every serve.health_check_period_s: one tiny forward on the forward thread (after the
        batch in progress); an exception or a stall past serve.health_check_timeout_s restarts the replica."""
        await self.batcher.run_in_worker(self.scorer.score, [PROBE])

    def info(self) -> dict:
        b = self.batcher
        return self.scorer.info() | {"replica": self.replica, "pid": os.getpid(), "batches": dict(b.stats),
                                     "queued_items": b.queued,
                                     "forward_ms": {"fixed": round(1000 * b.profile[0], 3), "per_item": round(1000 * b.profile[1], 3),
                                                    "slowdown": round(b.slowdown, 3)}}


@serve.deployment
@serve.ingress(app)
class RelevanceService:
    def __init__(self, model, settings: dict):
        self.settings = s = ServeConfig(**settings)
        self.model = model
        app.state.api_key = None
        if s.api_key_env:
            key = os.environ.get(s.api_key_env, "")
            if not key:
                raise RuntimeError(f"serve.api_key_env: the environment variable {s.api_key_env} is empty or not set "
                                   "where the replica runs (set it before Ray starts)")
            app.state.api_key = key.encode()
        self.counts = {"ok": 0, "refused_latency_budget": 0, "refused_queue_full": 0, "unavailable": 0,
                       "retried_replica_died": 0, "cancelled": 0}
        self.timings: deque[dict] = deque(maxlen=1000)  # per-phase seconds of the latest requests

    async def _call_model(self, pairs: list[tuple[str, str]]) -> dict:
        """The model's answer; a replica that dies holding the request (its work is lost, never answered) is
        retried on another one, at most twice. Overload and unavailability become HTTPError 503/429."""
        s = self.settings
        for attempt in range(3):
            try:
                reply = await self.model.score.remote(pairs)
            except BackPressureError:
                self.counts["refused_queue_full"] += 1
                raise HTTPError(s.overload_status, f"overloaded: {s.queued_requests()} requests already wait for a "
                                "free replica (serve.max_queued_requests). Retry after a backoff, or fall back",
                                reason="queue_full", retry_after_s=1.0) from None
            except DeploymentUnavailableError as exc:
                self.counts["unavailable"] += 1
                raise HTTPError(503, f"the model is unavailable: {exc.message}", reason="unavailable",
                                retry_after_s=5.0) from None
            except ActorDiedError:
                if attempt == 2:
                    self.counts["unavailable"] += 1
                    raise HTTPError(503, "the model replica died three times while holding this request",
                                    reason="unavailable", retry_after_s=5.0) from None
                self.counts["retried_replica_died"] += 1
                continue
            if "refused" in reply:
                self.counts["refused_latency_budget"] += 1
                refused = dict(reply["refused"])
                raise HTTPError(s.overload_status, refused.pop("error"), **refused)
            return reply

    @app.post("/v1/relevance", response_model=RelevanceResponse,
              responses={401: {}, 413: {}, 429: {"model": Refusal}, 503: {"model": Refusal}})
    async def relevance(self, req: RelevanceRequest, request: Request) -> Response:
        from student.data import product_text

        t_handler = time.perf_counter()
        s = self.settings
        if len(req.items) > s.max_items:
            raise HTTPError(413, f"{len(req.items)} items in one request; the limit is {s.max_items} (serve.max_items)")
        pairs = []
        for item in req.items:
            try:
                attrs = item.attributes()
            except ValueError as exc:
                raise HTTPError(422, str(exc)) from None
            for field, value in {"query": req.query, "title": item.title, **attrs}.items():
                if len(value) > s.max_field_chars:
                    raise HTTPError(422, f"item {item.id!r}: field {field!r} has {len(value)} characters; the limit is "
                                         f"{s.max_field_chars} (serve.max_field_chars)")
            pairs.append((req.query, product_text(item.title, json.dumps(attrs))))
        t_call = time.perf_counter()
        try:
            reply = await self._call_model(pairs)
        except asyncio.CancelledError:  # the client went away or the proxy's request_timeout_s passed
            self.counts["cancelled"] += 1
            raise
        t_reply = time.perf_counter()
        body = {"model": reply["model"], "model_digest": reply["digest"],
                "results": [{"id": item.id, **r} for item, r in zip(req.items, reply["results"])]}
        out = Response(json.dumps(body), media_type="application/json")  # built once, not re-validated
        done = time.perf_counter()
        t0 = request.scope.get("state", {}).get("t0", t_handler)
        timing = reply["timing"]
        inside = timing["queue_s"] + timing["compute_s"]
        self.timings.append({"parse": t_handler - t0, "validate": t_call - t_handler, "queue": timing["queue_s"],
                             **{k[:-2]: timing.get(k, 0.0) for k in ("tokenize_s", "model_s", "post_s")},
                             "hop": t_reply - t_call - inside, "respond": done - t_reply, "ingress_total": done - t0})
        self.counts["ok"] += 1
        return out

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", responses={401: {}})
    async def model_info(self) -> dict:
        """The model (from whichever replica answers), the limits, what the ingress counted, and the mean, median and
        99th percentile milliseconds of each phase over the latest 1000 answered requests."""
        s = self.settings
        phases = {}
        if self.timings:
            for name in self.timings[0]:
                values = [t[name] for t in self.timings]
                values.sort()
                phases[name] = {"mean": round(1000 * statistics.fmean(values), 3),
                                "p50": round(1000 * values[len(values) // 2], 3),
                                "p99": round(1000 * values[min(len(values) - 1, int(0.99 * len(values)))], 3)}
        return await self.model.info.remote() | {
            "max_items": s.max_items, "max_batch_size": s.max_batch_size, "max_ongoing_requests": s.ongoing_requests(),
            "latency_budget_ms": s.latency_budget_ms, "max_queued_requests": s.queued_requests(),
            "requests": dict(self.counts), "timing_ms": {"requests": len(self.timings), **phases}}


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `serve deploy`: args = {student_dir, settings?: {...}}."""
    settings = ServeConfig(**args.get("settings", {}))
    # torch's OpenMP threads sleep instead of spinning while idle: on a shared machine spinning threads starve the
    # proxy and tokenisation (measured 4x slower forwards under load; onnxruntime sessions are set up alike)
    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    model = {"max_ongoing_requests": settings.ongoing_requests(), "max_queued_requests": settings.queued_requests(),
             "health_check_period_s": settings.health_check_period_s,
             "health_check_timeout_s": settings.health_check_timeout_s,
             "max_surge_percent": settings.max_surge_percent, "graceful_shutdown_wait_loop_s": 0.2,
             "logging_config": {"enable_access_log": False},  # the ingress logs each request once
             "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus, "runtime_env": env}}
    if settings.autoscaling:
        model["autoscaling_config"] = settings.autoscaling.model_dump()
    else:
        model["num_replicas"] = settings.replicas
    # the ingress parses JSON and waits: no CPU reserved, room for every request the model replicas can hold or
    # queue, so overload is refused by the model tier with a JSON body rather than by the proxy
    holds = settings.ongoing_requests() * settings.max_replicas() + settings.queued_requests()
    ingress = {"num_replicas": 1, "max_ongoing_requests": 2 * holds, "max_queued_requests": settings.queued_requests(),
               "backpressure_config": {"status_code": settings.overload_status, "retry_after_s": 1},
               "max_surge_percent": 100, "graceful_shutdown_wait_loop_s": 0.2,
               "logging_config": {"enable_access_log": settings.access_log}, "ray_actor_options": {"num_cpus": 0}}
    student = str(Path(args["student_dir"]).resolve())
    return RelevanceService.options(**ingress).bind(StudentModel.options(**model).bind(student, settings.model_dump()),
                                                    settings.model_dump())
