"""Benchmark: the Serve endpoint at 127.0.0.1 under load, overload, a replica kill, a redeploy and a soak.

Phases (one server; each phase optional but the first):
  load       in R rounds (--rounds, default 3): the same serving path in-process (one 16-item request; the
             saturated items/s of max-batch calls), then for each client count C (default 1, then 32) C clients for
             T/R seconds sending 16-item requests back to back (a refused client waits the retry_after_s it got,
             with exponential backoff and jitter, as the README tells batch callers). Goals per round against that round's reference, median over rounds. After
             the first 1-client phase, the per-phase timing of /v1/model: where the time between in-process and
             served goes.
  overload   (--overload F) requests arriving at F x the requests/s of the busiest load phase, whatever the answers
             (open loop): accepted p50/p99 against serve.latency_budget_ms, how fast refusals come, other errors.
             With --autoscale MAX (1 to MAX replicas on demand): when the second replica ran, and the share of
             requests refused in the phase's first and last thirds.
  kill       (--kill) C clients; one model replica is SIGKILLed a third into the phase: errors, requests retried
             by the ingress, the longest wait, the seconds until the deployment runs every replica again.
  redeploy   (--redeploy) C clients; a third into the phase another student is deployed in place of this one:
             failed requests, and when the answers switched to the new student's digest.
  reload failure (--reload-failure) C clients; a third into the phase a reload to a student whose weights are
             corrupt (it passes the launcher's file check, its replicas cannot start), through the launcher's
             Supervisor.reload as SIGHUP does: errors, digests answering, /v1/model's reload counts.
  body flood (--body-flood) C clients while another sends a 48 MiB body every 2 s: what the flood got (413), and
             the normal callers' p50/p99 against the budget.
  soak       (--soak SECONDS) C clients for that long: model replica RSS every 10 s, p50/p99, errors per minute.

    .venv/bin/python bench/serve_load.py [STUDENT_OR_RUN_DIR] [--backend ...] [--precision ...] [--clients 1,32]
        [--seconds 30] [--rounds 3] [--items 16] [--replicas 1] [--replica-cpus N] [--budget-ms 500] [--no-access-log]
        [--overload 4] [--kill] [--redeploy] [--reload-failure] [--body-flood] [--soak SECONDS] [--phase-clients 4]

Without a target it serves the best student of runs/local if there is one, else a random MiniLM student.
Goals: 1-client p50 <= 1.5 x in-process + 10 ms; saturated items/s >= 0.8 x in-process on the same path; at 4x the
saturating load accepted p99 <= the budget, refusals within 100 ms, no other 5xx; kill: no errors, no wait > 2 s;
redeploy and reload failure: 0 failed requests, the old digest answering after a failed reload; body flood: 413,
normal callers' p99 within the budget; soak: RSS growth <= 10% after warm-up, 0 errors, last-minute p99 <= 1.2 x the first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# as in the replica (serve/app.py): idle OpenMP threads sleep, so the in-process reference runs the same way
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._serve_load_phases import (Recorder, body_flood_phase, kill_phase, redeploy_phase,  # noqa: E402
                                     reload_failure_phase, soak_phase, summarize, watch_replicas)


def _tiny_student(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import MINILM, resolve_model

    enc = resolve_model(MINILM)
    torch.manual_seed(seed)
    model = LRKDStudent.from_encoder(enc, StudentConfig(labels=["E", "S", "C", "I"], extractor="poly", mode="unified",
                                                        perspectives=["user_intent", "structured_analysis", "business_rules"]))
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(enc))
    return folder


def _failing_reload(student: Path, broken: Path, settings):
    """What SIGHUP does when the run's student has been replaced by one whose weights are cut short: the launcher's
    Supervisor.reload, serving `student`, asked to move to `broken` (files all there, replicas cannot load it)."""
    import shutil

    from serve.supervise import Supervisor

    shutil.copytree(student, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return Supervisor(student, settings, reload=lambda: broken).reload


def in_process(scorer, texts: list[tuple[str, str]], batch: int, repeats: int = 20) -> tuple[float, float]:
    """Median ms of scoring `texts` (tokenisation included) and items/s of scoring `batch` items per call."""
    big = (texts * (batch // len(texts) + 1))[:batch]
    scorer.score(texts), scorer.score(big)
    one, full = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.score(texts)
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        scorer.score(big)
        full.append(time.perf_counter() - t)
    return 1000 * statistics.median(one), batch / statistics.median(full)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    p.add_argument("--clients", default="1,32", help="comma list: one load phase per client count, same server")
    p.add_argument("--seconds", type=float, default=30.0, help="per load phase over all rounds, and per other phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds of in-process reference + each load phase")
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=None, help="CPUs per model replica (default: cores / replicas)")
    p.add_argument("--budget-ms", type=float, default=500.0, help="serve.latency_budget_ms (0: no load shedding)")
    p.add_argument("--no-access-log", action="store_true", help="serve.access_log: false (no log line per request)")
    p.add_argument("--overload", type=float, default=None, metavar="F", help="open-loop phase at F x the saturated rate")
    p.add_argument("--autoscale", type=int, default=None, metavar="MAX", help="serve.autoscaling from 1 to MAX replicas "
                   "(metric demand): the overload phase then records the running replicas and refusals over time")
    p.add_argument("--kill", action="store_true", help="SIGKILL one model replica under load")
    p.add_argument("--redeploy", action="store_true", help="deploy another student under load")
    p.add_argument("--reload-failure", action="store_true", help="reload a student whose replicas cannot start, under load")
    p.add_argument("--body-flood", action="store_true", help="48 MiB bodies every 2 s beside normal callers")
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS", help="steady load for this long")
    p.add_argument("--phase-clients", type=int, default=4, help="clients of the kill, redeploy and soak phases")
    p.add_argument("--max-requests", type=int, default=100_000, help="hard cap on requests per load phase")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = p.parse_args()

    import requests
    from ray import serve

    from hardware.cpu import machine
    from serve.config import ServeConfig
    from serve.launch import deploy, ensure_export, find_student, run_local
    from serve.scorer import StudentScorer
    from student.data import product_text
    from student.export import weights_digest
    from hardware.runtime import free_port

    tmp = tempfile.TemporaryDirectory()
    if args.target:
        student = find_student(args.target)
    elif (ROOT / "runs" / "local" / "student" / "metrics.json").exists():
        student = find_student(ROOT / "runs" / "local")
    else:
        student = _tiny_student(Path(tmp.name) / "student")
    pairs = [json.loads(x) for x in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[: args.items]]
    body = {"query": pairs[0]["query"], "items": [{"id": r["product_id"], "title": r["product_title"]} for r in pairs]}

    cores = float(os.cpu_count() or 1)
    # a replica's CPUs are its torch/onnxruntime threads (Ray sets OMP_NUM_THREADS), like the in-process reference's
    settings = ServeConfig(port=free_port(), max_batch_size=64, replicas=args.replicas,
                           num_cpus=args.replica_cpus or cores / args.replicas, backend=args.backend,
                           precision=args.precision, access_log=not args.no_access_log,
                           latency_budget_ms=args.budget_ms or None,
                           autoscaling={"min_replicas": 1, "max_replicas": args.autoscale} if args.autoscale else None)
    ensure_export(student, settings)
    local = StudentScorer(str(student), settings.device, settings.backend, settings.precision)
    path = f"{local.backend} {local.precision}"
    texts = [(body["query"], product_text(i["title"], "{}")) for i in body["items"]]

    base = run_local(student, settings, block=False)
    url = base + "/v1/relevance"
    requests.post(url, json=body, timeout=60).raise_for_status()  # warm-up
    # rounds: the in-process reference, then each client count, again and again: on a machine shared with other
    # jobs the load changes by the minute, and a ratio means something only between measurements this close
    clients = [int(x) for x in args.clients.split(",")]
    recs, walls, rounds, breakdown = {c: Recorder(url, body, args.items) for c in clients}, dict.fromkeys(clients, 0.0), [], {}
    for r in range(args.rounds):
        forward_ms, items_per_s = in_process(local, texts, settings.max_batch_size)
        row = {"in_process_forward_ms": forward_ms, "in_process_items_per_s": items_per_s, "load": os.getloadavg()[0]}
        for c in clients:
            n0 = len(recs[c].records)
            span = recs[c].closed_loop(c, args.seconds / args.rounds, args.max_requests)
            walls[c] += span[1] - span[0]
            part = summarize(recs[c].records[n0:], args.items, span)
            row[f"{c}_clients"] = {k: part[k] for k in ("p50_ms", "p99_ms", "items_per_s", "refused", "errors")}
            if r == 0:  # /v1/model times the latest 1000 answered requests: this phase's
                timing = requests.get(base + "/v1/model", timeout=30).json()["timing_ms"]
                breakdown[c] = {"client_mean_ms": part["mean_ms"], "client_p99_ms": part["p99_ms"],
                                **{k: {"mean": v["mean"], "p99": v["p99"]} for k, v in timing.items() if k != "requests"},
                                "proxy_http_client_mean": part["mean_ms"] - timing["ingress_total"]["mean"]}
        rounds.append(row)
    del local
    phases = [{"clients": c, "seconds": args.seconds, **summarize(recs[c].records, args.items, (0.0, walls[c]))}
              for c in clients]
    busiest = max(phases, key=lambda ph: ph["clients"])
    extra = {}
    if args.overload:
        rate = args.overload * busiest["requests_per_s"]
        rec = Recorder(url, body, args.items)
        replicas_seen = watch_replicas() if args.autoscale else None
        span = rec.open_loop(rate, args.seconds)
        extra["overload"] = {"factor": args.overload, "rate_per_s": rate, **summarize(rec.records, args.items, span)}
        if replicas_seen:
            extra["overload"]["autoscale"] = replicas_seen.finish(rec.records, span)
    if args.kill:
        extra["kill"] = kill_phase(Recorder(url, body, args.items), args.phase_clients, args.seconds, args.replicas)
    if args.redeploy:
        other = _tiny_student(Path(tmp.name) / "other", seed=1)

        def redeploy() -> str:  # what SIGHUP to `thinkbroad serve` does
            deploy(other, settings)
            return weights_digest(other)

        extra["redeploy"] = redeploy_phase(Recorder(url, body, args.items), args.phase_clients, args.seconds, redeploy)
    if args.reload_failure:
        extra["reload_failure"] = reload_failure_phase(Recorder(url, body, args.items), args.phase_clients, args.seconds,
                                                       _failing_reload(student, Path(tmp.name) / "broken", settings),
                                                       base + "/v1/model")
    if args.body_flood:
        extra["body_flood"] = body_flood_phase(Recorder(url, body, args.items), args.phase_clients, args.seconds, url)
    if args.soak:
        extra["soak"] = soak_phase(Recorder(url, body, args.items), args.phase_clients, args.soak)
    counts = requests.get(base + "/v1/model", timeout=30).json()["requests"]
    serve.shutdown()
    med = statistics.median
    top = max(clients)
    goal_p50 = [1.5 * r["in_process_forward_ms"] + 10 for r in rounds]
    summary = {
        "student": str(student), "path": path, "replicas": args.replicas, "replica_cpus": settings.num_cpus,
        "items_per_request": args.items, **machine(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "latency_budget_ms": settings.latency_budget_ms, "phases": phases, "phase_breakdown_ms": breakdown,
        **extra, "ingress_counts": counts,
        "rounds": rounds, "in_process_forward_ms": med(r["in_process_forward_ms"] for r in rounds),
        "in_process_items_per_s": med(r["in_process_items_per_s"] for r in rounds),
        "access_log": settings.access_log, "max_ongoing_requests": settings.ongoing_requests(),
        # the goals per round (served against the reference measured just before), then the median over rounds
        "goal_p50_ms": med(goal_p50),
        "p50_over_goal": med(r["1_clients"]["p50_ms"] / g for r, g in zip(rounds, goal_p50)) if 1 in clients else None,
        "saturated_vs_in_process": med(r[f"{top}_clients"]["items_per_s"] / r["in_process_items_per_s"] for r in rounds),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(one_line(summary, args))
    tmp.cleanup()
    return 0


def one_line(s: dict, args) -> str:
    cells = [f"{ph['clients']} client(s): {ph['items_per_s']:.0f} items/s, p50 {ph['p50_ms']:.1f} ms, p99 "
             f"{ph['p99_ms']:.1f} ms, {ph['refused']} refused, {ph['errors']} errors" for ph in s["phases"]]
    log = "on" if s["access_log"] else "off"
    line = (f"serve load ({s['path']}, {s['replicas']} replica(s) x {s['replica_cpus']:g} CPU, access log {log}, "
            f"budget {s['latency_budget_ms']} ms, {args.items} items/request, {args.seconds:g} s per phase): "
            + "; ".join(cells) + f"; in-process {s['in_process_forward_ms']:.1f} ms per request (goal 1-client p50 <= "
            f"{s['goal_p50_ms']:.1f} ms; p50/goal per round, median {s['p50_over_goal'] or float('nan'):.2f}), "
            f"{s['in_process_items_per_s']:.0f} items/s at batch 64 (served/in-process per round, median "
            f"{s['saturated_vs_in_process']:.2f}x, goal >= 0.8x; {len(s['rounds'])} rounds)")
    for c, b in s["phase_breakdown_ms"].items():
        line += (f"; {c} client(s), mean ms: client {b['client_mean_ms']:.1f}, proxy+HTTP {b['proxy_http_client_mean']:.1f}, "
                 + ", ".join(f"{k} {b[k]['mean']:.1f}" for k in ("parse", "validate", "queue", "tokenize", "model", "post",
                                                                "hop", "respond") if k in b))
    if "overload" in s:
        o = s["overload"]
        line += (f"; overload {o['factor']:g}x ({o['rate_per_s']:.0f} req/s): {o['ok']} ok p50 {o['p50_ms']:.0f} ms p99 "
                 f"{o['p99_ms']:.0f} ms, {o['refused']} refused (p99 {o['refused_p99_ms']:.0f} ms, max "
                 f"{o['refused_max_ms']:.0f} ms), {o['errors']} errors {o['error_statuses']}")
    if "autoscale" in s.get("overload", {}):
        a = s["overload"]["autoscale"]
        line += (f"; autoscaling 1..{args.autoscale}: second replica running after {a['second_replica_after_s']:.1f} s, "
                 f"refused {100 * a['refused_share_first']:.0f}% of requests in the first third -> "
                 f"{100 * a['refused_share_last']:.0f}% in the last")
    if "kill" in s:
        k = s["kill"]
        line += (f"; kill 1 of {k['replicas']} replicas under {k['clients']} clients: {k['errors']} errors, "
                 f"{k['refused']} refused, longest wait {k['longest_wait_ms']:.0f} ms, noticed after "
                 f"{k['noticed_after_s']:.1f} s, back after {k['back_after_s']:.1f} s (replica start "
                 f"{k['replica_start_s']:.1f} s)")
    if "redeploy" in s:
        r = s["redeploy"]
        line += (f"; redeploy under {r['clients']} clients: {r['errors']} errors, {r['refused']} refused, p99 "
                 f"{r['p99_ms']:.0f} ms, new digest answering after {r['first_new_answer_s'] or float('nan'):.1f} s, "
                 f"last old answer {r['last_old_answer_s'] or float('nan'):.1f} s")
    if "reload_failure" in s:
        r = s["reload_failure"]
        line += (f"; failed reload under {r['clients']} clients: {r['errors']} errors, {r['refused']} refused, p99 "
                 f"{r['p99_ms']:.0f} ms, reload took {r['reload_s']:.1f} s, new digests answering {r['digests_answering']}, "
                 f"{r['answered_after_reload']}/{r['requests_after_reload']} answered after it, /v1/model reloads "
                 f"{r['reloads']}")
    if "body_flood" in s:
        b = s["body_flood"]
        line += (f"; body flood ({b['flood_mib']:g} MiB x {b['flood_requests']}: {b['flood_statuses']}, p50 "
                 f"{b['flood_p50_ms']:.0f} ms) beside {b['clients']} clients: p50 {b['p50_ms']:.0f} ms p99 {b['p99_ms']:.0f} ms, "
                 f"{b['refused']} refused, {b['errors']} errors")
    if "soak" in s:
        k = s["soak"]
        line += (f"; soak {k['seconds']:g} s x {k['clients']} clients: {k['ok']} ok, {k['errors']} errors, "
                 f"{k['refused']} refused, RSS growth after warm-up {100 * k['rss_growth_after_warmup']:.1f}%, p99 last/first "
                 f"minute {k['p99_last_over_first_minute']:.2f}")
    line += f"; ingress counts {s['ingress_counts']}; {s['cpu']}; load {s['load_average']} -> {args.output}"
    return line


if __name__ == "__main__":
    sys.exit(main())
