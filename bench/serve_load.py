"""Benchmark: bounded load on the Serve endpoint at 127.0.0.1 — C concurrent clients for T seconds, each sending
16-item requests — vs the in-process forward time of the same 16-item batch. Writes JSON, prints one line.

    .venv/bin/python bench/serve_load.py [STUDENT_OR_RUN_DIR] [--clients 32] [--seconds 30] [--items 16]

Without a target it serves the best student of runs/local if there is one, else a tiny random student.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_student(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import MINILM, resolve_model

    enc = resolve_model(MINILM)
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(enc, StudentConfig(labels=["E", "S", "C", "I"], extractor="poly", mode="unified",
                                                        perspectives=["user_intent", "structured_analysis", "business_rules"]))
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(enc))
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=None)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--replica-cpus", type=float, default=float(os.cpu_count() or 1))
    p.add_argument("--max-requests", type=int, default=100_000, help="hard cap on requests, whatever the time")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = p.parse_args()

    import requests

    from serve.app import StudentScorer
    from serve.config import ServeConfig
    from serve.launch import find_student, run_local
    from student.data import product_text

    tmp = tempfile.TemporaryDirectory()
    if args.target:
        student = find_student(args.target)
    elif (ROOT / "runs" / "local" / "student" / "metrics.json").exists():
        student = find_student(ROOT / "runs" / "local")
    else:
        student = _tiny_student(Path(tmp.name) / "student")
    pairs = [json.loads(x) for x in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[: args.items]]
    body = {"query": pairs[0]["query"], "items": [{"id": r["product_id"], "title": r["product_title"]} for r in pairs]}

    # the replica gets the machine's cores, like the in-process reference (Ray gives an actor one thread per CPU)
    settings = ServeConfig(port=_free_port(), max_batch_size=64, batch_wait_timeout_s=0.005, num_cpus=args.replica_cpus)
    # in-process forward of the same batch, with the scorer the replica runs
    local = StudentScorer(str(student))
    texts = [(body["query"], product_text(i["title"], "{}")) for i in body["items"]]
    local.score(texts)
    fwd = []
    for _ in range(20):
        t = time.perf_counter()
        local.score(texts)
        fwd.append(time.perf_counter() - t)
    forward_ms = 1000 * statistics.median(fwd)
    del local

    url = run_local(student, settings, block=False) + "/v1/relevance"
    requests.post(url, json=body, timeout=60).raise_for_status()  # warm-up
    latencies, errors, lock = [], [], threading.Lock()
    stop_at = time.time() + args.seconds

    def client():
        s = requests.Session()
        while time.time() < stop_at:
            with lock:
                if len(latencies) + len(errors) >= args.max_requests:
                    return
            t = time.perf_counter()
            try:
                r = s.post(url, json=body, timeout=60)
                ok = r.status_code == 200 and len(r.json()["results"]) == args.items
            except requests.RequestException:
                ok = False
            with lock:
                (latencies if ok else errors).append(1000 * (time.perf_counter() - t))

    t0 = time.time()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t0
    from ray import serve

    serve.shutdown()
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2] if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    summary = {
        "student": str(student), "replica_cpus": args.replica_cpus, "clients": args.clients, "seconds": args.seconds, "items_per_request": args.items,
        "requests_ok": len(lat), "errors": len(errors), "requests_per_s": len(lat) / wall,
        "items_per_s": len(lat) * args.items / wall, "p50_ms": p50, "p99_ms": p99,
        "in_process_forward_ms": forward_ms, "goal_p50_ms": 1.5 * forward_ms + 10,
        "p50_within_goal": p50 <= 1.5 * forward_ms + 10,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"serve load ({args.clients} clients x {args.seconds:g} s, {args.items} items/request): "
          f"{summary['requests_per_s']:.1f} req/s ({summary['items_per_s']:.0f} items/s), p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"{len(errors)} errors; in-process forward {forward_ms:.1f} ms (goal p50 <= {summary['goal_p50_ms']:.1f} ms) -> {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
