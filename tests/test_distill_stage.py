"""A tiny end-to-end distill run on the smoke config: targets from the base teacher (vLLM on Ray Data), MiniLM
embeddings, and the student variants trained side by side on Ray Train."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_distill_on_smoke_config_writes_every_variant(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["distill"]["teacher"] = "base"  # the SFT/DPO path is covered by the teacher tests
    cfg_file = tmp_path / "smoke.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "distill", "--config", str(cfg_file), "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "student" / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"vanilla", "logit_kd", "lrkd-poly-average", "lrkd-poly-unified"}
    test_rows = json.loads((run_dir / "data" / "manifest.json").read_text())["rows"]["test"]
    for run in metrics["runs"]:
        m = run["metrics"]
        assert m["n"] == test_rows and 0 <= m["macro_f1"] <= 1
        assert sum(map(sum, m["confusion"]["matrix"])) == test_rows
        if run["variant"].startswith("lrkd"):
            assert sum(sum(c.values()) for c in m["attribution"].values()) == test_rows
            assert 0 < m["extractor_params"] < 1_000_000
    targets = run_dir / "student" / "targets" / "targets.parquet"
    import pyarrow.parquet as pq

    t = pq.read_table(targets)
    assert t.num_rows == 16 * 3 and t.schema.field("embedding").type.list_size == 384

    student = run_dir / "student" / "variants" / "lrkd-poly-unified-seed0" / "best"
    again = subprocess.run([sys.executable, "-m", "workflows.cli", "eval", "--config", str(cfg_file), "--run-dir", str(run_dir),
                            "--student", str(student)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["macro_f1"] == pytest.approx(
        next(r for r in metrics["runs"] if r["variant"] == "lrkd-poly-unified")["metrics"]["macro_f1"])

    # the ablation reuses the variants distill trained and adds the lambda = 0 ones
    abl = subprocess.run([sys.executable, "-m", "workflows.cli", "ablate", "--config", str(cfg_file), "--run-dir", str(run_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert abl.returncode == 0, abl.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(run_dir / "student" / "ablation.csv")))
    assert {(r["extractor"], r["mode"], float(r["lambda"])) for r in rows} >= {
        ("poly", m, lam) for m in ("average", "unified") for lam in (0.0, 0.1)}
    assert {r["variant"] for r in rows} >= {"vanilla", "logit_kd"}
    assert abl.stdout.count("student [") == 2, "only the two lambda = 0 variants are new"
    png = (run_dir / "student" / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| lrkd-poly-unified-lam0 |" in (run_dir / "student" / "ablation.md").read_text()
