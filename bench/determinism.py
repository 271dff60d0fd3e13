"""Benchmark: one seed, one result? Two `thinkbroad run`s of the same config and seed into fresh run folders on this
machine, then every artifact compared byte for byte (sha256) and, for JSON, with the fields that record time left
out (seconds, finished_at, timings). Writes bench/results/determinism.json (and docs/determinism.json with
--docs), prints a Markdown table per artifact group and one summary line. The README quotes them as generated blocks
(`<!-- begin docs/determinism.json: determinism.table -->` ... `<!-- end docs/determinism.json -->`, and
determinism.summary inline) that `python -m bench.docs_tables` renders from docs/determinism.json.

    .venv/bin/python bench/determinism.py [--config configs/smoke.yaml] [--workdir /tmp/thinkbroad-determinism]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# JSON keys that record when or how fast, not what: left out of the content comparison
VOLATILE = {"seconds", "finished_at", "train_seconds", "started_at", "throughput", "completion_tokens_per_s",
            "latency_ms", "forward_ms", "wall_s", "elapsed_s", "model_path", "student"}
# artifact groups, by path prefix under the run folder (first match wins)
GROUPS = [("data/", "prepare: splits"), ("mpcot/", "generate: rationales, SFT rows"), ("teacher/sft/", "SFT teacher"),
          ("teacher/dpo/", "DPO teacher"), ("teacher/eval/", "teacher evaluation"),
          ("student/targets/", "student targets"), ("student/examples/", "student examples"),
          ("student/variants/", "students (weights, predictions, metrics)"), ("student/", "student reports"),
          ("lrkd", "LRKD students"), ("logit_kd", "logit-KD students"), ("vanilla", "vanilla students"), ("", "other")]


def _strip(obj, run: str = ""):
    """The JSON without the fields that record time, and with the run's own folder written RUN_DIR (two runs live
    in two folders; a path inside the run is the same artifact)."""
    if isinstance(obj, dict):
        return {k: _strip(v, run) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v, run) for v in obj]
    if isinstance(obj, str) and run:
        return obj.replace(run, "RUN_DIR")
    return obj


def _digest(path: Path, content: bool, run: Path | None = None) -> str:
    if content and path.suffix == ".json":
        try:
            text = json.dumps(_strip(json.loads(path.read_text()), str(run or "")), sort_keys=True)
            return hashlib.sha256(text.encode()).hexdigest()
        except json.JSONDecodeError:
            pass
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(run: Path) -> dict[str, Path]:
    skip = ("trainer/", "ray/", "logs/", "mlflow/", ".config_hash")  # mlflow/: the tracking store (run ids, times)
    return {p.relative_to(run).as_posix(): p for p in run.rglob("*")
            if p.is_file() and not any(s in p.relative_to(run).as_posix() for s in skip) and not p.name.startswith(".")}


def compare(a: Path, b: Path) -> dict:
    fa, fb = _files(a), _files(b)
    groups: dict[str, dict] = {}
    for rel in sorted(set(fa) | set(fb)):
        group = next(name for prefix, name in GROUPS if rel.startswith(prefix))
        g = groups.setdefault(group, {"files": 0, "identical_bytes": 0, "identical_content": 0, "only_one_run": [],
                                      "differ": []})
        g["files"] += 1
        if rel not in fa or rel not in fb:
            g["only_one_run"].append(rel)
            continue
        same_bytes = _digest(fa[rel], False) == _digest(fb[rel], False)
        same = same_bytes or _digest(fa[rel], True, a) == _digest(fb[rel], True, b)
        g["identical_bytes"] += same_bytes
        g["identical_content"] += same
        if not same:
            g["differ"].append(rel)
    return groups


def table(groups: dict) -> str:
    lines = ["| artifacts | files | identical bytes | identical content (time fields and the run's folder left out) | differ |",
             "|---|---|---|---|---|"]
    for name, g in groups.items():
        differ = ", ".join(g["differ"][:4]) + (f" (+{len(g['differ']) - 4})" if len(g["differ"]) > 4 else "")
        only = f"; in one run only: {', '.join(g['only_one_run'][:3])}" if g["only_one_run"] else ""
        lines.append(f"| {name} | {g['files']} | {g['identical_bytes']} | {g['identical_content']} | {differ}{only} |")
    return "\n".join(lines)


def main() -> int:
    from hardware.cpu import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--workdir", default="/tmp/thinkbroad-determinism")
    ap.add_argument("--set", action="append", default=[], help="config override for both runs")
    ap.add_argument("--docs", action="store_true", help="also write docs/determinism.json (the README's figures)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    times = {}
    for name in ("a", "b"):
        t0 = time.time()
        cmd = [str(ROOT / ".venv" / "bin" / "thinkbroad"), "run", "--config", args.config, "--run-dir", str(work / name),
               "--no-plan", *[x for s in args.set for x in ("--set", s)]]
        with open(work.with_name(work.name + f"-{name}.log"), "w") as log:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
        times[name] = round(time.time() - t0, 1)
    groups = compare(work / "a", work / "b")
    # the student stage alone: run a's students retrained from its own examples and targets (a copy without them)
    shutil.copytree(work / "a", work / "c", ignore=shutil.ignore_patterns("variants", "trainer", "logs"))
    t0 = time.time()
    cmd = [str(ROOT / ".venv" / "bin" / "thinkbroad"), "distill", "--config", args.config, "--run-dir", str(work / "c"),
           *[x for s in args.set for x in ("--set", s)]]
    with open(work.with_name(work.name + "-c.log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    times["retrain"] = round(time.time() - t0, 1)
    retrain = compare(work / "a" / "student" / "variants", work / "c" / "student" / "variants")
    result = {"bench": "determinism", "machine": machine(), "config": args.config, "overrides": args.set,
              "run_seconds": times, "groups": groups, "retrain_groups": retrain}
    out = ROOT / "bench" / "results" / "determinism.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        (ROOT / "docs" / "determinism.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(groups))
    print("students retrained from run a's examples and targets:\n" + table(retrain))
    print(f"{summary(result)} -> {out}")
    return 0


def summary(result: dict) -> str:
    """The one-line summary the bench prints (the README may quote it from docs/determinism.json)."""
    groups = result["groups"]
    same = sum(g["identical_content"] for g in groups.values())
    total = sum(g["files"] for g in groups.values())
    line = (f"determinism: {same}/{total} artifacts identical in content across two runs of {result['config']} "
            f"({', '.join(n for n, g in groups.items() if g['differ'] or g['only_one_run']) or 'none'} differ)")
    if "retrain_groups" in result:
        r = result["retrain_groups"]
        line += (f"; students retrained from the same examples and targets: {sum(g['identical_bytes'] for g in r.values())}"
                 f"/{sum(g['files'] for g in r.values())} files byte-identical, "
                 f"{sum(g['identical_content'] for g in r.values())} identical in content")
    return line


if __name__ == "__main__":
    raise SystemExit(main())
