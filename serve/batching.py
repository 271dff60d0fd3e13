"""Items of concurrent requests scored together, off the event loop. No Ray import (unit-tested on its own).

A forward starts as soon as the model is free, with the queued items up to `max_batch_size`: a lone request does
not wait for company, and while one forward runs the next batch gathers. `wait_s` (serve.batch_wait_timeout_s) lets
an idle model wait that long after the oldest queued item arrived for a batch to fill; under load the oldest item
has waited longer than that already. Ray's `@serve.batch` differs in three ways that cost here: it takes one
coroutine per item (100 per request at serve.max_items), waits `batch_wait_timeout_s` before every batch that is not
full, and fixes the next batch while one runs, so batches alternate between a few items and many.

The forward runs in one worker thread, so the event loop keeps accepting, refusing and answering health checks
while the model computes. The batcher knows how many items are queued and how long a forward takes, which is what
load shedding by a latency budget needs (`expected_s`).
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class _Job:
    items: list
    future: asyncio.Future
    submitted: float
    taken: int = 0  # items handed to forwards so far (a job larger than a batch spans several)
    done: int = 0
    results: list = field(default_factory=list)
    started: float | None = None  # when its first item entered a forward
    phases: dict = field(default_factory=dict)  # seconds per phase of the forwards it was in

    def deliver(self, a: int, b: int, results: list, phases: dict) -> None:
        """The results of its items a..b from one forward, with that forward's seconds per phase; the last
        resolves the future."""
        self.results[a:b] = results
        for k, v in phases.items():
            self.phases[k] = self.phases.get(k, 0.0) + v
        self.done += b - a
        if self.done == len(self.items):
            self.future.set_result(None)


class CostModel:
    """How long forwards take on this replica: a forward of n items takes (a + b n) x slowdown, (a, b) = `profile`
    timed at start, the slowdown the largest ratio of measured to profiled time over the latest 8 forwards, so a
    machine that slows down (other jobs, longer texts) shrinks the queue at once, and every forward counts, whatever
    its size. `queued`: items waiting or in the running forward (kept by the Batcher)."""

    def __init__(self, max_batch_size: int, profile: tuple[float, float] = (0.0, 0.0)):
        self.max_batch_size, self.profile = max_batch_size, profile
        self.queued = 0
        self._slowdown: deque[float] = deque([1.0], maxlen=8)

    @property
    def slowdown(self) -> float:
        return max(self._slowdown)

    def _seconds(self, n: int) -> float:
        a, b = self.profile
        return self.slowdown * (math.ceil(n / self.max_batch_size) * a + n * b)

    def expected_s(self, items: int) -> float:
        """Seconds until `items` more would be scored: every queued item first, in full batches."""
        return self._seconds(self.queued + items)

    def idle_s(self, items: int) -> float:
        """Seconds `items` would take on an idle replica (what a retry elsewhere could hope for)."""
        return self._seconds(items)

    def cost_per_item_s(self) -> float:
        """Seconds per item in full batches at the current speed."""
        a, b = self.profile
        return self.slowdown * (a / self.max_batch_size + b)

    def over_budget(self, items: int, budget_s: float) -> bool:
        """Whether `items` more would be scored later than `budget_s` from now. Never when nothing is queued: a
        request that can start at once is served, however large."""
        return self.queued > 0 and self.expected_s(items) > budget_s

    def measured(self, items: int, seconds: float) -> None:
        """A forward of `items` items took `seconds`: its ratio to the profiled time joins the latest slowdowns."""
        a, b = self.profile
        if a + b > 0:
            self._slowdown.append(seconds / (a + b * items))


class Batcher(CostModel):
    """`forward(items, phases) -> results` (one result per item, in order; it may add seconds per phase to `phases`)
    runs in a worker thread on batches of at most `max_batch_size` items taken from the submitted jobs in order."""

    def __init__(self, forward: Callable[[list, dict], list], max_batch_size: int, wait_s: float = 0.0,
                 profile: tuple[float, float] = (0.0, 0.0)):
        super().__init__(max_batch_size, profile)
        self.forward, self.wait_s = forward, wait_s
        self.stats = {"forwards": 0, "items": 0, "largest": 0}
        self.busy_s = 0.0  # seconds the forward thread has spent on forwards (autoscaling's demand)
        self._jobs: deque[_Job] = deque()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    def check(self) -> None:
        """Raises when the loop that feeds the forwards has died (a bug): its queued requests would never be
        answered, so the replica's health check fails and Ray Serve replaces it."""
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the batching loop has stopped: {task.exception()!r}")

    async def submit(self, items: list) -> tuple[list, dict]:
        """Score `items`; returns (results, timing) with timing = {queue_s, compute_s, **phase seconds}.
        Cancelling the caller drops its items that no forward has taken yet."""
        if not items:
            return [], {}
        loop = asyncio.get_running_loop()
        self.check()  # a dead loop fails requests at once rather than queueing them for ever
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._guarded())
        job = _Job(items, loop.create_future(), time.perf_counter(), results=[None] * len(items))
        self._jobs.append(job)
        self.queued += len(items)
        self._wakeup.set()
        try:
            await job.future
        except asyncio.CancelledError:
            self.queued -= len(items) - job.taken  # the taken ones leave the count when their forward ends
            raise
        now = time.perf_counter()
        return job.results, {"queue_s": job.started - job.submitted, "compute_s": now - job.started, **job.phases}

    async def run_in_worker(self, fn: Callable, *args) -> Any:
        """Run `fn` on the forward thread, after the forward in progress (health checks use it)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to max_batch_size items from the queued jobs in order: [(job, start, stop)]."""
        parts, room = [], self.max_batch_size
        while self._jobs and room:
            job = self._jobs[0]
            if job.future.done():  # cancelled while queued
                self._jobs.popleft()
                continue
            n = min(room, len(job.items) - job.taken)
            parts.append((job, job.taken, job.taken + n))
            job.taken += n
            room -= n
            if job.taken == len(job.items):
                self._jobs.popleft()
        return parts

    async def _guarded(self) -> None:
        """The loop; should it ever fail, every waiting request fails with it (none is left hanging) and `check`
        reports it until the replica is replaced."""
        try:
            await self._run()
        except BaseException as exc:
            for job in self._jobs:
                if not job.future.done():
                    job.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batching stopped"))
            self._jobs.clear()
            self.queued = 0
            raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not any(not j.future.done() for j in self._jobs):
                self._jobs.clear()
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.wait_s:
                pending = sum(len(j.items) - j.taken for j in self._jobs if not j.future.done())
                left = self._jobs[0].submitted + self.wait_s - time.perf_counter()
                if pending < self.max_batch_size and left > 0:
                    await asyncio.sleep(left)
            parts = self._take()
            if not parts:
                continue
            items = [x for job, a, b in parts for x in job.items[a:b]]
            start, phases = time.perf_counter(), {}
            for job, _, _ in parts:
                job.started = job.started or start
            try:
                results = await loop.run_in_executor(self._worker, self.forward, items, phases)
                error = None
            except Exception as exc:  # every job in this batch fails with it; the loop goes on
                results, error = None, exc
            took = time.perf_counter() - start
            self.busy_s += took
            self.queued -= len(items)  # a job cancelled meanwhile took only its untaken items off
            s = self.stats
            s["forwards"], s["items"], s["largest"] = s["forwards"] + 1, s["items"] + len(items), max(s["largest"], len(items))
            if error is None:
                self.measured(len(items), took)
            i = 0
            for job, a, b in parts:
                if job.future.done():
                    i += b - a
                    continue
                if error is not None:
                    self.queued -= len(job.items) - job.taken  # its later items will not be scored
                    job.future.set_exception(error)
                    continue
                job.deliver(a, b, results[i:i + b - a], phases)
                i += b - a
