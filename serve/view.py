"""What the ingress knows about the model tier without queueing behind scoring: the running replicas (from Ray
Serve's controller, at most once per `max_age_s`), the model's static description (fetched once per digest), each
replica's batch counters (carried by every answer), and the reloads the launcher reported."""
from __future__ import annotations

import asyncio
import time

MODEL = "StudentModel"
STATS = ("replica", "pid", "batches", "queued_items", "forward_ms")  # per replica, in every answer


class ModelView:
    def __init__(self, handle):
        self.handle = handle
        self.static: dict | None = None  # the scorer's info() of the digest answers carry
        self.digest: str | None = None  # the digest of the latest answer
        self.stats: dict[str, dict] = {}  # replica id -> its latest counters
        self.running = 0
        self._status_at = -1e9
        self._status_task: asyncio.Task | None = None
        self.reloads = {"ok": 0, "failed": 0, "last_error": None}

    def record(self, reply: dict) -> None:
        self.digest = reply["digest"]
        stats = reply.get("replica")
        if stats:
            seen = self.stats.get(stats["replica"])
            if seen is None or seen["batches"]["forwards"] <= stats["batches"]["forwards"]:
                self.stats[stats["replica"]] = stats | {"seen": time.monotonic()}

    async def refresh_replicas(self, caller=None, max_age_s: float = 2.0) -> int:
        """Running replicas of the model deployment. The hot path (caller given) never waits: it starts a refresh
        in the background when the count is stale; /readyz waits for a fresh one."""
        if time.monotonic() - self._status_at > max_age_s and (self._status_task is None or self._status_task.done()):
            self._status_task = asyncio.create_task(self._count())
        if caller is None:
            try:
                await asyncio.wait_for(asyncio.shield(self._status_task), 5.0)
            except Exception:  # the controller is busy or gone: the last count stands
                pass
        if caller is not None:
            caller.replicas = self.running
        return self.running

    async def _count(self) -> None:
        from ray import serve

        def count() -> int:
            app = serve.get_replica_context().app_name
            status = serve.status().applications.get(app)
            deployment = status.deployments.get(MODEL) if status else None
            return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0

        try:
            self.running = await asyncio.to_thread(count)
        except Exception:  # the controller is busy or restarting: the last count stands
            return
        self._status_at = time.monotonic()

    async def warm_up(self) -> bool:
        """Whether a call through the handle has reached a replica (once true, it stays true)."""
        if self.static is None:
            await self._fetch_static(timeout_s=10.0)
        return self.static is not None

    async def _fetch_static(self, timeout_s: float) -> None:
        try:
            info = await asyncio.wait_for(self.handle.info.remote(), timeout_s)
        except Exception:  # overloaded or starting: what was known stands
            return
        stats = {k: info.pop(k) for k in STATS}
        self.record({"digest": self.digest or info["digest"], "replica": stats})
        self.static = info

    async def describe(self) -> dict:
        """The model (static info, fetched with a short timeout when missing or when answers name a new digest)
        and the replicas' counters: `batches` summed over the replicas seen in the last minute."""
        if self.static is None or (self.digest is not None and self.static.get("digest") != self.digest):
            await self._fetch_static(timeout_s=1.0)
        now = time.monotonic()
        live = {k: v for k, v in self.stats.items() if now - v["seen"] < 60}
        batches = {"forwards": 0, "items": 0, "largest": 0}
        for r in live.values():
            b = r["batches"]
            batches = {"forwards": batches["forwards"] + b["forwards"], "items": batches["items"] + b["items"],
                       "largest": max(batches["largest"], b["largest"])}
        replicas = {k: {n: v for n, v in r.items() if n != "seen"} for k, r in live.items()}
        return (self.static or {"model": None, "digest": self.digest}) | {
            "batches": batches, "replicas": replicas, "running_replicas": self.running,
            "queued_items": sum(r["queued_items"] for r in live.values())}

    def note_reload(self, failure: str | None) -> dict:
        if failure is None:
            self.reloads["ok"] += 1
        else:
            self.reloads["failed"] += 1
            self.reloads["last_error"] = failure[:500]
        return dict(self.reloads)
