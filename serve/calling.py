"""How the ingress calls the model replicas: within an end-to-end deadline, retrying what a lost replica held,
trying a refusal once more elsewhere when time allows, and turning every failure into an HTTPError whose JSON body
names no internals.

The deadline: a request's latency budget starts when it reached the ingress (serve/http.py stamps it). The ingress
sends the wall-clock deadline with the items; a replica refuses against the time actually left (serve/app.py), so
time spent in the proxy, the ingress and Ray Serve's router queue counts. The ingress itself stops waiting a little
before the HTTP proxy's timeout (`give_up_s`): a caller gets a JSON 503, never the proxy's 408.
"""
from __future__ import annotations

import asyncio
import time

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from serve.config import ServeConfig
from serve.http import HTTPError, internal_error

RETRIES = 2  # a request whose replica died (RayActorError: ActorDiedError, ActorUnavailableError) is sent again


def give_up_s(s: ServeConfig) -> float | None:
    """Seconds after arrival at which the ingress answers 503 itself: 0.25 s before the proxy's timeout."""
    timeout = s.timeout_s()
    return None if timeout is None else max(0.5 * timeout, timeout - 0.25)


class ModelCaller:
    """`handle`: the StudentModel deployment handle. `replicas`: its running replicas as last seen (the ingress
    keeps it current); a refusal is retried only when there is another replica to try."""

    def __init__(self, handle, settings: ServeConfig):
        self.handle, self.s = handle, settings
        self.replicas = 1
        self.counts = {"ok": 0, "refused_latency_budget": 0, "refused_deadline": 0, "refused_queue_full": 0,
                       "refused_shutting_down": 0, "unavailable": 0, "timed_out": 0, "failed": 0,
                       "retried_replica_died": 0, "retried_refusal": 0, "cancelled": 0}

    def deadline(self, t0: float) -> float | None:
        """Wall-clock deadline of a request that reached the ingress at perf_counter() == t0 (None: no budget)."""
        if self.s.latency_budget_ms is None:
            return None
        return time.time() - (time.perf_counter() - t0) + self.s.latency_budget_ms / 1000

    async def score(self, pairs: list, t0: float) -> dict:
        deadline, limit = self.deadline(t0), give_up_s(self.s)
        stop = None if limit is None else t0 + limit
        deaths = refusals = 0
        while True:
            reply = await self._once(pairs, deadline, stop)
            if reply is None:  # the replica died holding it
                if deaths == RETRIES:
                    self.counts["unavailable"] += 1
                    raise HTTPError(503, f"the model replica died {RETRIES + 1} times while holding this request",
                                    reason="unavailable", retry_after_s=5.0)
                deaths += 1
                self.counts["retried_replica_died"] += 1
                continue
            if "refused" not in reply:
                return reply
            refused = dict(reply["refused"])
            if refusals == 0 and self._worth_retrying(refused, deadline):
                refusals += 1
                self.counts["retried_refusal"] += 1
                continue
            self.counts[f"refused_{refused['reason']}"] += 1
            refused.pop("idle_s", None)
            raise HTTPError(self.s.overload_status, refused.pop("error"), **refused)

    def _worth_retrying(self, refused: dict, deadline: float | None) -> bool:
        """Another replica may take it: there is one, and the time left would score it twice over on an idle one."""
        if self.replicas < 2 or deadline is None or refused.get("reason") != "latency_budget":
            return False
        return deadline - time.time() > 2 * refused.get("idle_s", float("inf"))

    async def _once(self, pairs: list, deadline: float | None, stop: float | None) -> dict | None:
        """One call: the reply, or None when the replica died; HTTPError for everything else."""
        s = self.s
        left = None if stop is None else stop - time.perf_counter()
        if left is not None and left <= 0:
            return self._timed_out()
        response = self.handle.score.remote(pairs, deadline)
        try:
            return await asyncio.wait_for(response, left)
        except asyncio.TimeoutError:
            response.cancel()
            return self._timed_out()
        except BackPressureError:
            self.counts["refused_queue_full"] += 1
            raise HTTPError(s.overload_status, f"overloaded: {s.queued_requests()} requests already wait for a "
                            "free replica (serve.max_queued_requests). Retry after a backoff, or fall back",
                            reason="queue_full", retry_after_s=1.0) from None
        except DeploymentUnavailableError:
            self.counts["unavailable"] += 1
            raise HTTPError(503, "the model is not available (not deployed, or being replaced)",
                            reason="unavailable", retry_after_s=5.0) from None
        except RayActorError:
            return None
        except RequestCancelledError:
            raise asyncio.CancelledError from None
        except RayTaskError as exc:  # the replica raised: a failed forward (scoring is idempotent, but would fail again)
            self.counts["failed"] += 1
            raise internal_error(exc, "the model failed while scoring this request") from None

    def _timed_out(self):
        self.counts["timed_out"] += 1
        raise HTTPError(503, f"no model replica answered within {give_up_s(self.s):g} s (starting, restarting or "
                        "overloaded). Retry after a backoff, or fall back", reason="unavailable", retry_after_s=2.0)
