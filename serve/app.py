"""The student on Ray Serve: encoder -> latent reasoning extractor -> classifier, no text generation.

  POST /v1/relevance  {query, items: [{id, title, brand?, color?, description?, bullet_points?, <other>?}]}
                      -> per item: label, probabilities per label, expected-relevance score, dominant perspective
  GET  /healthz (alive)   GET /readyz (ready: a model replica has run its warm-up forwards)   GET /v1/model
  (OpenAPI docs at /docs)

Two deployments. `RelevanceService` (the HTTP ingress, no CPU reserved) checks the key and the body's size, parses
and validates, and calls `StudentModel` (the replicas holding the student) within the request's deadline
(serve/calling.py). Each `StudentModel` replica scores the items of concurrent requests together
(serve/batching.py) on the path that `serve.backend` / `serve.precision` pick, and refuses at once a request it
could not finish before its deadline (`serve.latency_budget_ms` from arrival at the ingress). Every error is JSON
(serve/http.py); a refusal for overload is 503 (or 429) with `Retry-After` and says why.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import time
from collections import deque
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve.autoscale import DEMAND, demand
from serve.batching import Batcher
from serve.calling import ModelCaller
from serve.config import ServeConfig
from serve.http import HTTPError, install, internal_error
from serve.schema import Problem, Refusal, RelevanceRequest, RelevanceResponse, set_limits
from serve.scorer import StudentScorer
from serve.view import ModelView

# a replica queues work for this share of the latency budget, leaving the rest for HTTP, parsing and the hops (a
# choice, not fitted; on 2 shared cores under 4x overload those took more: docs/results.md, "Serving under load
# and faults")
QUEUE_SHARE = 0.75
PROBE = ("usb c cable", "Anker USB-C to USB-C cable 2 m | color: black")  # the health check's tiny forward

app = FastAPI(title="thinkbroad relevance", description=__doc__)
install(app)


@serve.deployment
class StudentModel:
    """One replica of the student; Ray Serve routes to it only once __init__ has run its warm-up forwards.
    `score` refuses (returns {"refused": ...}) a request whose items would be scored after its deadline, unless
    nothing is queued and time is left: a request that can start at once is served."""

    def __init__(self, student_dir: str, settings: dict):
        s = ServeConfig(**settings)
        self.scorer = StudentScorer(student_dir, s.device, s.backend, s.precision)
        self.batcher = Batcher(self.scorer.score, s.max_batch_size, s.batch_wait_timeout_s, self._profile(s.max_batch_size))
        self.budget_ms = s.latency_budget_ms
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.refused_items = 0
        self._reported = (time.monotonic(), 0.0, 0)  # when demand was last reported: (time, busy_s, refused_items)

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

    def _refusal(self, n: int, deadline: float | None) -> dict | None:
        """Why `n` items cannot be scored in time, or None. `deadline`: wall clock (from the ingress); without one
        (a direct handle call) the budget counts from now."""
        if self.budget_ms is None:
            return None
        b, budget = self.batcher, self.budget_ms / 1000
        left = budget if deadline is None else min(budget, deadline - time.time())
        common = {"retry_after_s": round(b.expected_s(0), 3), "idle_s": round(b.idle_s(n), 4)}
        if left <= 0:
            return {"reason": "deadline", **common, "error": f"overloaded: this request waited {1000 * (budget - left):.0f}"
                    f" ms before a replica took it, past the latency budget of {self.budget_ms:g} ms "
                    "(serve.latency_budget_ms). Retry after a backoff, or fall back"}
        if b.over_budget(n, left - (1 - QUEUE_SHARE) * budget):  # the rest of the budget is for the way back
            return {"reason": "latency_budget", **common,
                    "error": f"overloaded: {b.queued} items are queued on this replica; {n} more would be scored in "
                             f"about {1000 * b.expected_s(n):.0f} ms, over the {1000 * left:.0f} ms left of the latency "
                             f"budget of {self.budget_ms:g} ms (serve.latency_budget_ms). Retry after a backoff, or fall back"}
        return None

    async def score(self, pairs: list[tuple[str, str]], deadline: float | None = None) -> dict:
        refused = self._refusal(len(pairs), deadline)
        if refused:
            self.refused_items += len(pairs)
            return {"refused": refused}
        results, timing = await self.batcher.submit(pairs)
        return {"results": results, "timing": timing, "model": self.scorer.name, "digest": self.scorer.digest,
                "replica": self.stats()}

    async def check_health(self) -> None:
        """Ray Serve calls this every serve.health_check_period_s: the batching loop must be alive, and one tiny
        forward runs on the forward thread (after the batch in progress); an exception or a stall past
        serve.health_check_timeout_s restarts the replica."""
        self.batcher.check()
        await self.batcher.run_in_worker(self.scorer.score, [PROBE])

    def record_autoscaling_stats(self) -> dict:
        """Ray Serve asks every few seconds (with serve.autoscaling): the load that arrived since (serve/autoscale.py)."""
        now, b = time.monotonic(), self.batcher
        then, busy, refused = self._reported
        self._reported = (now, b.busy_s, self.refused_items)
        return {DEMAND: demand(b.busy_s - busy, self.refused_items - refused, b.cost_per_item_s(), now - then)}

    def stats(self) -> dict:
        b = self.batcher
        return {"replica": self.replica, "pid": os.getpid(), "batches": dict(b.stats), "queued_items": b.queued,
                "forward_ms": {"fixed": round(1000 * b.profile[0], 3), "per_item": round(1000 * b.profile[1], 3),
                               "slowdown": round(b.slowdown, 3)}}

    def info(self) -> dict:
        return self.scorer.info() | self.stats()


@serve.deployment
@serve.ingress(app)
class RelevanceService:
    def __init__(self, model, settings: dict):
        from student.data import product_text  # imports torch: here, not in the first request (1.7 s on a busy host)

        self.product_text = product_text
        self.settings = s = ServeConfig(**settings)
        self.caller = ModelCaller(model, s)
        self.counts = self.caller.counts
        app.state.api_key, app.state.max_body_bytes = None, s.max_body_bytes
        set_limits(s)
        if s.api_key_env:
            key = os.environ.get(s.api_key_env, "")
            if not key:
                raise RuntimeError(f"serve.api_key_env: the environment variable {s.api_key_env} is empty or not set "
                                   "where the replica runs (set it before Ray starts)")
            app.state.api_key = key.encode()
        self.view = ModelView(model)
        self.timings: deque[dict] = deque(maxlen=1000)  # per-phase seconds of the latest requests
        self.draining, self.in_flight = False, 0

    @property
    def model(self):
        return self.caller.handle

    @app.post("/v1/relevance", response_model=RelevanceResponse,
              responses={401: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Problem},
                         429: {"model": Refusal}, 500: {"model": Problem}, 503: {"model": Refusal}})
    async def relevance(self, req: RelevanceRequest, request: Request) -> Response:
        t_handler = time.perf_counter()
        t0 = request.scope.get("state", {}).get("t0", t_handler)
        if self.draining:
            self.counts["refused_shutting_down"] += 1
            raise HTTPError(503, "shutting down: send this request to another instance", reason="shutting_down",
                            retry_after_s=1.0)
        self.in_flight += 1
        try:
            return await self._relevance(req, t0, t_handler)
        except asyncio.CancelledError:  # the client went away
            self.counts["cancelled"] += 1
            raise
        except HTTPError:
            raise
        except Exception as exc:  # a bug here: logged, and the caller gets JSON without internals
            raise internal_error(exc) from None
        finally:
            self.in_flight -= 1

    async def _relevance(self, req: RelevanceRequest, t0: float, t_handler: float) -> Response:
        product_text = self.product_text
        pairs = [(req.query, product_text(item.title, json.dumps(item.attributes()))) for item in req.items]
        t_call = time.perf_counter()
        await self.view.refresh_replicas(self.caller)
        reply = await self.caller.score(pairs, t0)
        t_reply = time.perf_counter()
        self.view.record(reply)
        body = {"model": reply["model"], "model_digest": reply["digest"],
                "results": [{"id": item.id, **r} for item, r in zip(req.items, reply["results"])]}
        out = Response(json.dumps(body), media_type="application/json")  # built once, not re-validated
        done = time.perf_counter()
        timing = reply["timing"]
        inside = timing["queue_s"] + timing["compute_s"]
        self.timings.append({"parse": t_handler - t0, "validate": t_call - t_handler, "queue": timing["queue_s"],
                             **{k[:-2]: timing.get(k, 0.0) for k in ("tokenize_s", "model_s", "post_s")},
                             "hop": t_reply - t_call - inside, "respond": done - t_reply, "ingress_total": done - t0})
        self.counts["ok"] += 1
        return out

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the ingress runs (a load balancer's readiness probe should use /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": Problem}})
    async def readyz(self):
        """Ready: not shutting down, a model replica runs (it ran its warm-up forwards before it could), and this
        ingress has reached one through its handle (the first call sets up the routing, so no request pays for it)."""
        running = await self.view.refresh_replicas(max_age_s=0.5)
        warm = running and await self.view.warm_up()
        if self.draining or not warm:
            why = "shutting down" if self.draining else "no model replica has finished starting yet" if not running \
                else "the ingress has not reached a model replica yet"
            return JSONResponse(status_code=503, content={"status": "not ready", "error": why, "replicas": running},
                                headers={"Retry-After": "1"})
        return {"status": "ready", "replicas": running}

    @app.get("/v1/model", responses={401: {"model": Problem}})
    async def model_info(self) -> dict:
        """The model and its replicas as the ingress last saw them (no call queues behind scoring), the limits,
        what the ingress counted, and the mean, median and 99th percentile milliseconds of each phase over the
        latest 1000 answered requests."""
        s = self.settings
        await self.view.refresh_replicas(max_age_s=2.0)  # Ray Serve's controller, not the model replicas
        phases = {}
        if self.timings:
            for name in self.timings[0]:
                values = sorted(t[name] for t in self.timings)
                phases[name] = {"mean": round(1000 * statistics.fmean(values), 3),
                                "p50": round(1000 * values[len(values) // 2], 3),
                                "p99": round(1000 * values[min(len(values) - 1, int(0.99 * len(values)))], 3)}
        return await self.view.describe() | {
            "max_items": s.max_items, "max_batch_size": s.max_batch_size, "max_ongoing_requests": s.ongoing_requests(),
            "latency_budget_ms": s.latency_budget_ms, "max_queued_requests": s.queued_requests(),
            "max_body_bytes": s.max_body_bytes, "requests": dict(self.counts), "reloads": self.view.reloads,
            "timing_ms": {"requests": len(self.timings), **phases}}

    def drain(self) -> int:
        """SIGTERM to `thinkbroad serve`: refuse new requests (503 shutting_down), /readyz 503; returns how many
        requests are still in flight (the launcher waits for 0, up to serve.graceful_shutdown_s)."""
        self.draining = True
        return self.in_flight

    def note_reload(self, failure: str | None) -> dict:
        """The launcher reports each SIGHUP reload here; failures are counted in /v1/model (`reloads`)."""
        return self.view.note_reload(failure)


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
             "graceful_shutdown_timeout_s": settings.graceful_shutdown_s,
             "logging_config": {"enable_access_log": False},  # the ingress logs each request once
             "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus, "runtime_env": env}}
    if settings.autoscaling:
        model["autoscaling_config"] = settings.autoscaling.ray_config()
    else:
        model["num_replicas"] = settings.replicas
    # the ingress parses JSON and waits: no CPU reserved, room for every request the model replicas can hold or
    # queue, so overload is refused by the model tier with a JSON body rather than by the proxy
    holds = settings.ongoing_requests() * settings.max_replicas() + settings.queued_requests()
    ingress = {"num_replicas": 1, "max_ongoing_requests": 2 * holds, "max_queued_requests": settings.queued_requests(),
               "backpressure_config": {"status_code": settings.overload_status, "retry_after_s": 1},
               "max_surge_percent": 100, "graceful_shutdown_wait_loop_s": 0.2,
               "graceful_shutdown_timeout_s": settings.graceful_shutdown_s,
               "logging_config": {"enable_access_log": settings.access_log}, "ray_actor_options": {"num_cpus": 0}}
    student = str(Path(args["student_dir"]).resolve())
    # versions that change only with what the replicas run: serve.run gives every deployment a new random version,
    # so each SIGHUP restarted the ingress too (its counters, its warm handle) and a rollback after a failed reload
    # replaced the very replicas that served. Ray 2.60 accepts a version only through the internal flag.
    # how a deploy rolls out (surge or one by one) is not what a replica runs: the launcher's one-by-one fallback
    # (serve/launch.py deploy) must not give the ingress, or a rollback's model, a new version
    served = settings.model_dump(exclude={"max_surge_percent", "surge_timeout_s"})
    model_version = _version(served, _fingerprint(Path(student)))
    ingress_version = _version(served)
    bound = StudentModel.options(**model).options(version=model_version, _internal=True).bind(student, settings.model_dump())
    return RelevanceService.options(**ingress).options(version=ingress_version, _internal=True).bind(bound, settings.model_dump())


def _fingerprint(folder: Path) -> list:
    """The student folder's files by name, size and modification time (a retrained student changes them)."""
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]


def _version(*parts) -> str:
    """A deployment version: the serving code (serve/*.py) and `parts`."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
