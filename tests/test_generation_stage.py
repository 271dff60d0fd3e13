"""The real Ray Data + vLLM path through the CLI: killed midway, rerun, exactly one row per task."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT
from mpcot.tasks import OUTPUT_SCHEMA

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
PAIRS, PERSPECTIVES = 30, 3


def _cli(*args):
    return [sys.executable, "-m", "workflows.cli", *args]


def test_generate_killed_midway_resumes_without_loss_or_duplicates(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["generation"].update(max_pairs=PAIRS, batch_size=6)
    cfg_file = tmp_path / "smoke.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    parts = run_dir / "mpcot" / "parts"
    args = _cli("generate", "--config", str(cfg_file), "--run-dir", str(run_dir), "--no-progress")

    first = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not list(parts.glob("batch-*.parquet")):
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    written = sorted(parts.glob("batch-*.parquet"))
    assert written, "the first attempt wrote no part before it was killed"
    rows_before = sum(pq.read_metadata(p).num_rows for p in written)
    assert not (run_dir / "mpcot" / "rationales.parquet").exists(), "killed too late: the run had finished"

    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # the engine stops with its actor (VLLMJudge.__del__, the engine inside the actor): no resource_tracker KeyError
    assert "Traceback" not in second.stdout + second.stderr, second.stderr[-3000:]
    out = run_dir / "mpcot"
    # a Parquet dataset: a folder of parts, in task order, that pyarrow reads whole, by column or file by file
    assert [p.name for p in (out / "rationales.parquet").iterdir()] == ["part-00000.parquet"]
    table = pq.read_table(out / "rationales.parquet")
    assert table.schema.equals(OUTPUT_SCHEMA)
    total = PAIRS * PERSPECTIVES
    ids = table.column("task_id").to_pylist()
    assert len(ids) == total and len(set(ids)) == total
    assert table.column("task_index").to_pylist() == list(range(total))
    assert pq.ParquetFile(out / "rationales.parquet" / "part-00000.parquet").metadata.num_rows == total
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reused"] == rows_before > 0
    assert manifest["generated_now"] == total - rows_before

    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["per_perspective"]) == {"user_intent", "structured_analysis", "business_rules"}
    assert all(s["rows"] == PAIRS for s in stats["per_perspective"].values())
    sft = pq.read_table(out / "sft.parquet")
    assert sft.num_rows == sum(table.column("correct").to_pylist()) == stats["overall"]["sft_rows"]
    assert not parts.exists()

    # a finished stage is not redone
    third = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "generate: up to date" in third.stdout
    assert json.loads((out / "manifest.json").read_text()) == manifest
