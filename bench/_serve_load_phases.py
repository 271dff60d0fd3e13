"""The load bench/serve_load.py puts on the endpoint: clients that record every request (closed loop, back to back
with the retry backoff the README advises, or open loop at a fixed rate), the summary of what they recorded, and
the phases with a fault or a long run: a replica kill, a redeploy, a failed reload, a body flood, a soak."""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


class Recorder:
    """Posts `body` to `url` from many threads; keeps (start, end, status, kind, digest, retry_after) per request.
    kind: ok | refused (503/429 with the service's JSON reason) | error (anything else, connection errors too)."""

    def __init__(self, url: str, body: dict, items: int):
        self.url, self.payload, self.items = url, json.dumps(body), items
        self.records: list[tuple] = []
        self.lock, self.local = threading.Lock(), threading.local()

    def post(self, scheduled: float | None = None) -> tuple:
        import requests

        s = getattr(self.local, "session", None) or requests.Session()
        self.local.session = s
        start = scheduled or time.perf_counter()  # open loop: from when the request was due, queueing included
        digest, retry, kind, status = None, None, "error", 0
        try:
            r = s.post(self.url, data=self.payload, headers={"content-type": "application/json"}, timeout=60)
            status = r.status_code
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if status == 200 and len(body.get("results", [])) == self.items:
                kind, digest = "ok", body["model_digest"]
            elif status in (429, 503) and "reason" in body:  # the body's estimate; the header is whole seconds
                kind, retry = "refused", float(body.get("retry_after_s", r.headers.get("Retry-After", 1)))
        except Exception:  # connection reset, timeout, bad JSON: an error like any other
            pass
        rec = (start, time.perf_counter(), status, kind, digest, retry)
        with self.lock:
            self.records.append(rec)
        return rec

    def closed_loop(self, clients: int, seconds: float, max_requests: int = 1_000_000) -> tuple[float, float]:
        """`clients` threads send back to back for `seconds`; a refused one first waits the retry_after_s it got,
        doubled for each refusal in a row (at most 2 s), times a random 0.5-1.5."""
        t0 = time.perf_counter()
        stop = t0 + seconds

        def client():
            refused = 0  # in a row: the wait doubles each time (up to 2 s), with jitter, as the README advises
            while time.perf_counter() < stop and len(self.records) < max_requests:
                rec = self.post()
                refused = refused + 1 if rec[3] == "refused" else 0
                if refused:
                    wait = min(2.0, rec[5] * 2 ** (refused - 1)) * random.uniform(0.5, 1.5)
                    time.sleep(min(wait, max(0.0, stop - time.perf_counter())))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return t0, time.perf_counter()

    def open_loop(self, rate: float, seconds: float, workers: int = 256) -> tuple[float, float]:
        """Requests due every 1/rate s for `seconds`, sent by a pool whatever the answers."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            k = 0
            while (due := t0 + k / rate) < t0 + seconds:
                time.sleep(max(0.0, due - time.perf_counter()))
                pool.submit(self.post, due)
                k += 1
        return t0, time.perf_counter()


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * q))] if v else float("nan")


def summarize(records: list[tuple], items: int, span: tuple[float, float] | None = None) -> dict:
    """Counts, accepted latency percentiles (ms) and items/s over the span, refusal latencies, error statuses."""
    wall = (span[1] - span[0]) if span else max(1e-9, max(r[1] for r in records) - min(r[0] for r in records))
    ok = [1000 * (r[1] - r[0]) for r in records if r[3] == "ok"]
    refused = [1000 * (r[1] - r[0]) for r in records if r[3] == "refused"]
    errors = [r[2] for r in records if r[3] == "error"]
    return {"requests": len(records), "ok": len(ok), "refused": len(refused), "errors": len(errors),
            "error_statuses": {str(c): errors.count(c) for c in sorted(set(errors))},
            "requests_per_s": len(ok) / wall, "items_per_s": len(ok) * items / wall,
            "p50_ms": _pct(ok, 0.5), "p99_ms": _pct(ok, 0.99), "max_ms": max(ok, default=float("nan")),
            "mean_ms": statistics.fmean(ok) if ok else float("nan"),
            "refused_p99_ms": _pct(refused, 0.99), "refused_max_ms": max(refused, default=float("nan"))}


def model_replicas() -> dict[str, int]:
    """Running model replicas: actor name -> pid."""
    import ray
    from ray.util.state import list_actors

    # this Ray instance's address: other Ray instances on the machine would make "auto" ambiguous
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in actors if "StudentModel" in (a.class_name or "")}


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["thinkbroad"].deployments["StudentModel"]
    return status.replica_states.get("RUNNING", 0)


class _ReplicaWatch:
    """Samples the running model replicas every 0.5 s from a thread until `finish`."""

    def __init__(self):
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.5):
            try:
                self.samples.append((time.perf_counter(), running_replicas()))
            except Exception:  # a controller call that failed under load: the next sample counts
                pass

    def finish(self, records: list[tuple], span: tuple[float, float]) -> dict:
        self.stop.set()
        self.thread.join()
        t0, t1 = span
        two = [t for t, n in self.samples if n >= 2]
        third = (t1 - t0) / 3

        def refused_share(lo, hi):
            part = [r for r in records if lo <= r[0] < hi]
            return sum(r[3] == "refused" for r in part) / max(1, len(part))

        return {"second_replica_after_s": (min(two) - t0) if two else float("nan"),
                "replicas": [(round(t - t0, 1), n) for t, n in self.samples[::4]],
                "refused_share_first": refused_share(t0, t0 + third), "refused_share_last": refused_share(t1 - third, t1)}


def watch_replicas() -> _ReplicaWatch:
    return _ReplicaWatch()


def kill_phase(rec: Recorder, clients: int, seconds: float, replicas: int) -> dict:
    """SIGKILL one model replica a third into a closed-loop phase; how the service answered and when it recovered."""
    victim_name, victim_pid = sorted(model_replicas().items())[0]
    out = {}

    def kill():
        time.sleep(seconds / 3)
        os.kill(victim_pid, signal.SIGKILL)
        out["killed_at"] = time.perf_counter()
        # noticed: Ray Serve runs fewer replicas; started: a new replica actor exists; back: it runs (then all do)
        while running_replicas() >= replicas:
            time.sleep(0.05)
        out["noticed_at"] = time.perf_counter()
        while len(set(model_replicas()) - {victim_name}) < replicas:
            time.sleep(0.05)
        out["started_at"] = time.perf_counter()
        while running_replicas() < replicas:
            time.sleep(0.05)
        out["back_at"] = time.perf_counter()

    th = threading.Thread(target=kill)
    th.start()
    span = rec.closed_loop(clients, seconds)
    th.join(timeout=120)
    s = summarize(rec.records, rec.items, span)
    killed = out["killed_at"]
    around = [r for r in rec.records if r[1] >= killed and r[0] <= killed + 5]  # answered after it, sent within 5 s
    return {**s, "clients": clients, "replicas": replicas, "killed_pid": victim_pid,
            "longest_wait_ms": max(1000 * (r[1] - r[0]) for r in rec.records),
            "longest_wait_around_kill_ms": max((1000 * (r[1] - r[0]) for r in around), default=float("nan")),
            "noticed_after_s": out.get("noticed_at", float("nan")) - killed,
            "new_replica_started_after_s": out.get("started_at", float("nan")) - killed,
            "back_after_s": out.get("back_at", float("nan")) - killed,
            # from Ray noticing to the new replica running: its process, then loading the student
            "replica_start_s": out.get("back_at", float("nan")) - out.get("noticed_at", float("nan"))}


def _a_third_in(rec: Recorder, clients: int, seconds: float, action) -> tuple[dict, dict]:
    """A closed-loop phase with `action()` called a third into it (in a thread): the phase's summary, and when the
    action started and finished and what it returned."""
    out = {}

    def act():
        time.sleep(seconds / 3)
        out["started"] = time.perf_counter()
        out["returned"] = action()
        out["finished"] = time.perf_counter()

    th = threading.Thread(target=act)
    th.start()
    span = rec.closed_loop(clients, seconds)
    th.join()
    return summarize(rec.records, rec.items, span), out


def redeploy_phase(rec: Recorder, clients: int, seconds: float, deploy) -> dict:
    """Deploy another student a third into a closed-loop phase; failed requests and when the digest switched."""
    s, out = _a_third_in(rec, clients, seconds, deploy)
    digest = out["returned"]
    new = [r for r in rec.records if r[4] == digest]
    old = [r for r in rec.records if r[3] == "ok" and r[4] != digest]
    t0 = out["started"]
    return {**s, "clients": clients, "new_digest": digest, "deploy_s": out["finished"] - t0,
            "first_new_answer_s": min(r[1] for r in new) - t0 if new else None,
            "last_old_answer_s": max(r[1] for r in old) - t0 if old else None, "answers_new": len(new),
            "answers_old": len(old)}


def reload_failure_phase(rec: Recorder, clients: int, seconds: float, reload, model_url: str) -> dict:
    """A third into a closed-loop phase, a reload to a student whose replicas cannot start (what SIGHUP does, through
    the launcher's Supervisor.reload): failed requests, digests answering, and what /v1/model counted. The requests
    after the reload are counted only when it ends within the phase (it did not in the measured run: 21.6 s)."""
    import requests

    s, out = _a_third_in(rec, clients, seconds, reload)
    info = requests.get(model_url, timeout=30).json()
    after = [r for r in rec.records if r[0] >= out["finished"]]
    return {**s, "clients": clients, "reload_s": out["finished"] - out["started"], "reloads": info.get("reloads"),
            "digests_answering": len({r[4] for r in rec.records if r[3] == "ok"}),  # 1: the old student throughout
            "answered_after_reload": sum(r[3] == "ok" for r in after), "requests_after_reload": len(after)}


def body_flood_phase(rec: Recorder, clients: int, seconds: float, url: str, mib: float = 48.0, every_s: float = 2.0) -> dict:
    """`clients` normal callers for `seconds` while another sends a `mib` MiB body (one item, millions of attribute
    keys) every `every_s` s: what the flood got back, and the normal callers' latency beside it."""
    import requests

    keys = int(mib * 2**20 / 19)  # '"k000000000": "v", ' is 19 bytes
    flood_body = json.dumps({"query": "x", "items": [{"id": "a", "title": "t",
                                                      "attributes": {f"k{i:09d}": "v" for i in range(keys)}}]}).encode()
    got, stop = [], threading.Event()

    def flood():
        s = requests.Session()
        while not stop.is_set():
            t = time.perf_counter()
            try:
                r = s.post(url, data=flood_body, headers={"content-type": "application/json"}, timeout=60)
                got.append((r.status_code, 1000 * (time.perf_counter() - t)))
            except Exception as exc:  # the server may close the connection on a body it will not read
                got.append((type(exc).__name__, 1000 * (time.perf_counter() - t)))
            stop.wait(every_s)

    th = threading.Thread(target=flood)
    th.start()
    span = rec.closed_loop(clients, seconds)
    stop.set()
    th.join()
    statuses: dict = {}
    for status, _ in got:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {**summarize(rec.records, rec.items, span), "clients": clients, "flood_mib": round(len(flood_body) / 2**20, 1),
            "flood_requests": len(got), "flood_statuses": statuses,
            "flood_p50_ms": statistics.median([ms for _, ms in got]) if got else float("nan")}


def soak_phase(rec: Recorder, clients: int, seconds: float) -> dict:
    """Steady load; model replica RSS every 10 s; per minute p50/p99, errors, refusals."""
    import psutil

    rss, stop = [], threading.Event()
    t0 = time.perf_counter()

    def sample():
        while not stop.wait(10):
            mem = {}
            for name, pid in model_replicas().items():
                try:
                    mem[name] = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    pass
            rss.append((time.perf_counter() - t0, mem))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    span = rec.closed_loop(clients, seconds)
    stop.set()
    minutes = []
    for m in range(int(seconds // 60) or 1):
        part = [r for r in rec.records if t0 + 60 * m <= r[1] < t0 + 60 * (m + 1)]
        if part:
            s = summarize(part, rec.items, (t0 + 60 * m, min(t0 + 60 * (m + 1), span[1])))
            minutes.append({"minute": m + 1, **{k: s[k] for k in ("ok", "refused", "errors", "p50_ms", "p99_ms", "items_per_s")}})
    warm = [x for x in rss if x[0] >= min(60.0, seconds / 5)]  # after a minute (or a fifth of a short soak)
    first, last = (warm[0][1], warm[-1][1]) if warm else ({}, {})
    growth = max((last[k] / first[k] - 1 for k in first if k in last), default=float("nan"))
    return {**summarize(rec.records, rec.items, span), "clients": clients, "seconds": seconds, "per_minute": minutes,
            "rss_mib": [(round(t, 1), {k[-8:]: round(v, 1) for k, v in m.items()}) for t, m in rss],
            "rss_growth_after_warmup": growth,
            "p99_last_over_first_minute": minutes[-1]["p99_ms"] / minutes[0]["p99_ms"] if minutes else float("nan")}
