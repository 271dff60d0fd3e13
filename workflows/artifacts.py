"""Run-directory artifacts: atomic writes and per-stage manifests that decide whether a stage can be skipped."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

MANIFEST = "manifest.json"
# what our atomic writers (here and pairs.parquet.write_parquet_atomic) name a file before renaming it
_TMP = re.compile(r"^\..+\.\d+\.tmp$")


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(obj, path: str | Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2, default=str) + "\n", path)


def fingerprint(path: str | Path) -> str:
    """Content hash of a file (or of every file under a folder, by relative name)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(stage_dir: str | Path) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def is_fresh(stage_dir: str | Path, config_hash: str, inputs: dict[str, str]) -> bool:
    """True when the stage finished before with the same config hash and the same input fingerprints."""
    m = read_manifest(stage_dir)
    return bool(m) and m.get("config_hash") == config_hash and m.get("inputs") == inputs


def invalidate(stage_dir: str | Path) -> None:
    """Call before a stage's first write: drops its old manifest, so a half-rewritten stage never looks finished
    (the manifest is written last), and the temp files a killed atomic write left anywhere under `stage_dir`."""
    stage_dir = Path(stage_dir)
    (stage_dir / MANIFEST).unlink(missing_ok=True)
    if stage_dir.is_dir():
        for leftover in stage_dir.rglob(".*.tmp"):
            if _TMP.match(leftover.name) and leftover.is_file():
                leftover.unlink(missing_ok=True)


def write_manifest(stage_dir: str | Path, stage: str, config_hash: str, inputs: dict[str, str], started: float, **info) -> dict:
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "inputs": inputs,
        "seconds": round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
    }
    write_json_atomic(manifest, Path(stage_dir) / MANIFEST)
    return manifest


def attempt_key(key: str, inputs: dict[str, str] | None = None) -> str:
    """The config key with the input fingerprints folded in: what partial work must match to be resumed."""
    if not inputs:
        return key
    return hashlib.sha256(json.dumps([key, inputs], sort_keys=True).encode()).hexdigest()[:16]


def start_attempt(work_dir: str | Path, key: str, what: str, inputs: dict[str, str] | None = None) -> None:
    """Partial work in `work_dir` (parts, checkpoints, a student's trained.json and best/) is resumed only if it was
    made with the same config key and the same input fingerprints; otherwise it is discarded, with a message. Call
    before a stage starts (or resumes) its work."""
    import shutil

    work_dir = Path(work_dir)
    marker = work_dir / ".config_hash"
    want = attempt_key(key, inputs)
    if work_dir.exists() and any(work_dir.iterdir()) and (not marker.exists() or marker.read_text().strip() != want):
        print(f"[thinkbroad] {what}: the config or the inputs changed since the earlier attempt; discarding {work_dir}",
              flush=True)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(want)
