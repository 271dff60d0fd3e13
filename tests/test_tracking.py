"""Experiment tracking (workflows/tracking.py): the stage's numbers in MLflow, once per result, on the local store and
on a tracking server; `tracking.backend: none` writes nothing. The smoke pipeline's store against its metrics.json:
tests/test_pipeline.py."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from hardware.runtime import free_port

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _prepare(run_dir: Path, *sets: str) -> int:
    from workflows.cli import main

    return main(["prepare", "--config", SMOKE, "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]])


def _runs(uri: str, experiment: str = "smoke") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, list(client.search_runs([exp.experiment_id])) if exp else []


def _check_prepare(client, runs: list, run_dir: Path) -> None:
    """One pipeline run for the folder and one nested prepare run holding the manifest's numbers and fingerprints."""
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    parent = [r for r in runs if r.data.tags.get("thinkbroad.kind") == "pipeline"]
    assert len(parent) == 1 and parent[0].data.tags["thinkbroad.run_dir"] == str(run_dir.resolve())
    assert parent[0].data.params["config.name"] == "smoke" and parent[0].data.params["config.distill.lam"] == "0.1"
    stages = [r for r in runs if r.data.tags.get("thinkbroad.kind") == "stage"]
    assert [r.info.run_name for r in stages] == ["prepare"]
    prep = stages[0]
    assert prep.data.tags["mlflow.parentRunId"] == parent[0].info.run_id and prep.info.status == "FINISHED"
    for split, n in manifest["rows"].items():
        assert prep.data.metrics[f"manifest.rows.{split}"] == n
    assert {k: v for k, v in prep.data.params.items() if k.startswith("input.")} == {
        f"input.{k}": v for k, v in manifest["inputs"].items()}
    assert [a.path for a in client.list_artifacts(prep.info.run_id)] == ["manifest.json"]


def test_a_stage_is_logged_once_with_its_manifests_numbers(tmp_path):
    run_dir = tmp_path / "run"
    assert _prepare(run_dir) == 0
    uri = f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}"
    client, runs = _runs(uri)
    _check_prepare(client, runs, run_dir)
    # again: the stage is up to date and its MLflow run is found, not made again
    assert _prepare(run_dir) == 0
    client, again = _runs(uri)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)
    # a nested run a killed process left half-logged (no `complete` tag) is replaced, not kept beside a new one
    from workflows import tracking
    from workflows.config import load_config

    prep = next(r for r in runs if r.info.run_name == "prepare")
    client.delete_tag(prep.info.run_id, tracking.COMPLETE)
    assert tracking.sync(load_config(SMOKE), run_dir) == 1
    client, after = _runs(uri)
    _check_prepare(client, after, run_dir)
    assert prep.info.run_id not in {r.info.run_id for r in after}


def test_backend_none_imports_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys; from workflows.cli import main; "
            f"rc = main(['prepare', '--config', {SMOKE!r}, '--run-dir', {str(run_dir)!r}, '--set', 'tracking.backend=none']); "
            "assert rc == 0; assert 'mlflow' not in sys.modules, 'mlflow imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["data"]
    assert not list(tmp_path.rglob("mlflow*")) and not list(tmp_path.rglob("mlruns"))


def test_an_unreachable_server_stops_before_any_stage_with_the_fix_named(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    assert _prepare(tmp_path / "run", f"tracking.uri={uri}") == 2
    err = capsys.readouterr().err
    assert f"tracking.uri {uri}: no MLflow tracking server answers" in err and "--set tracking.backend=none" in err
    assert not (tmp_path / "run" / "data").exists()


def test_metric_names_are_what_mlflow_accepts():
    from workflows.tracked import numbers, params_of

    flat = numbers({"ranking": {"ndcg@10": 0.5, "queries": 3}, "pairwise": {"a~b": 1}, "ok": True, "nan": float("nan"),
                    "ci95": [0.1, 0.2], "name": "x"})
    assert flat == {"ranking.ndcg_10": 0.5, "ranking.queries": 3.0, "pairwise.a_b": 1.0, "ci95.0": 0.1, "ci95.1": 0.2}
    assert params_of({"a": None, "b": [], "c": {"d": [1, 2]}}) == {"a": "null", "b": "[]", "c.d.0": "1", "c.d.1": "2"}


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 and a free port, with its own SQLite store and artifact folder."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = store / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                             "--artifacts-destination", str(store / "artifacts")],
                            cwd=store, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield uri, store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_a_tracking_server_gets_the_stage_once(tmp_path, mlflow_server, capsys):
    uri, store = mlflow_server
    run_dir = tmp_path / "run"
    for _ in range(2):  # the second run finds the stage up to date and its MLflow run on the server
        assert _prepare(run_dir, f"tracking.uri={uri}", "tracking.experiment=smoke-on-server") == 0
    out = capsys.readouterr().out
    assert out.count("[thinkbroad] tracking: 1 new MLflow run (prepare) -> " + uri + "/#/experiments/") == 1, out
    assert "View run" not in out  # MLflow's own two lines per run are left out
    client, runs = _runs(uri, "smoke-on-server")
    _check_prepare(client, runs, run_dir)
    assert not (run_dir / "mlflow").exists()  # nothing local: the server holds the runs and (proxied) the artifacts
    assert list((store / "artifacts").rglob("manifest.json"))
