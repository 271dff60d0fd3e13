"""Experiment tracking with MLflow: the driver logs each finished stage of a run directory (config `tracking`).

One MLflow run per run directory (the pipeline run: tagged with the folder, the config's name and the flattened
config as parameters), and under it a nested run per stage and per student, built from the files the stage wrote
(workflows/tracked.py): the numbers in the store are those of metrics.json, history.json and the rest. `sync` is
idempotent: a nested run is found by its key (the stage's manifest, or its files' content) before one is made, so a
rerun that skips a stage adds nothing, and a nested run that a killed process left half-logged (no `complete` tag)
is deleted and logged again.

The driver logs, not the Ray Train workers: see docs/tracking.md ("Where logging happens") for why.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from workflows.tracked import Record, params_of, records

KIND, RUN_DIR, KEY, STAGE, COMPLETE = ("thinkbroad.kind", "thinkbroad.run_dir", "thinkbroad.key", "thinkbroad.stage",
                                       "thinkbroad.complete")
PARENT = "mlflow.parentRunId"
STORE = "mlflow"  # RUN_DIR/mlflow: the local store (mlflow.db) and its artifacts (artifacts/)
_BATCH = 100  # MLflow's limit on parameters per log_batch call (metrics: 1000)


class TrackingError(RuntimeError):
    """Tracking is configured but cannot log; the message names `tracking.uri` and how to turn tracking off."""


def store_uri(cfg, run_dir: Path) -> str | None:
    """Where this run logs: `tracking.uri`, else a SQLite store in RUN_DIR/mlflow; None when tracking is off."""
    t = cfg.tracking
    if t.backend == "none":
        return None
    return t.uri or f"sqlite:///{(Path(run_dir) / STORE / 'mlflow.db').resolve()}"


def check(cfg) -> None:
    """Before a command starts its stages: a tracking server named by `tracking.uri` must answer, so a long run
    does not find out at its end that nothing could be logged."""
    uri = cfg.tracking.uri
    if cfg.tracking.backend == "none" or not uri or not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
            resp.read()
    except (OSError, urllib.error.URLError) as exc:
        raise TrackingError(f"tracking.uri {uri}: no MLflow tracking server answers ({exc}); start one (e.g. `mlflow "
                            "server --host 127.0.0.1 --port 5000`), point tracking.uri at it, or run without tracking: "
                            "--set tracking.backend=none") from None


@contextlib.contextmanager
def _quiet():
    """MLflow, alembic (the SQLite store's schema migrations) and SQLAlchemy log at INFO on first use; the pipeline's
    console shows warnings only (the whole output is still in RUN_DIR/logs)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: no usage reports
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # a server that went away fails in seconds, not minutes
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines per run: ours names the run once
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic", "sqlalchemy")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # MLflow 3.18's SQL store configures its mappers with a loader SQLAlchemy 2.1 deprecates (MLflow's to fix)
            warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _client(uri: str):
    with _quiet():
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # importing mlflow configures its logger at INFO: back to warnings
            logging.getLogger(name).setLevel(logging.WARNING)
        return MlflowClient(tracking_uri=uri)


def _all_runs(client, experiment_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _experiment(client, name: str, run_dir: Path, local: bool) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # the local store keeps its artifacts beside it; a server decides where its artifacts go
    where = (Path(run_dir) / STORE / "artifacts").resolve().as_uri() if local else None
    return client.create_experiment(name, artifact_location=where)


def _pipeline_run(client, experiment_id: str, cfg, run_dir: Path) -> str:
    """The run of this run directory: found by its folder, else made, with the flattened config as parameters."""
    folder = str(Path(run_dir).resolve())
    found = _all_runs(client, experiment_id, f"tags.`{KIND}` = 'pipeline' and tags.`{RUN_DIR}` = '{folder}'")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=cfg.name, tags={KIND: "pipeline", RUN_DIR: folder,
                                                                     "thinkbroad.config": cfg.name})
    _log(client, run.info.run_id, params_of(cfg.model_dump(mode="json"), "config."), {}, {})
    return run.info.run_id


def _log(client, run_id: str, params: dict, metrics: dict, series: dict, when: float | None = None) -> None:
    from mlflow.entities import Metric, Param

    stamp = int((when or time.time()) * 1000)
    entries = [Metric(k, v, stamp, 0) for k, v in sorted(metrics.items())]
    entries += [Metric(k, v, stamp, step) for k, points in sorted(series.items()) for step, v in points]
    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i:i + _BATCH])
    for i in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[i:i + 1000])


def _nested(client, experiment_id: str, parent: str, rec: Record) -> str:
    start = int((rec.started or rec.finished or time.time()) * 1000)
    run = client.create_run(experiment_id, start_time=start, run_name=rec.name,
                            tags={PARENT: parent, KIND: "stage", STAGE: rec.stage, KEY: rec.key})
    run_id = run.info.run_id
    _log(client, run_id, rec.params, rec.metrics, rec.series, rec.finished)
    for path, where in rec.artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path), where or None)
    client.set_tag(run_id, COMPLETE, "1")  # last: a run without it was cut short and is logged again
    client.set_terminated(run_id, "FINISHED", end_time=int((rec.finished or time.time()) * 1000))
    return run_id


def sync(cfg, run_dir: Path, log=None) -> int:
    """Log every finished stage and student of `run_dir` that the store does not hold yet; returns how many nested
    runs were made. A no-op with `tracking.backend: none` (nothing is imported or written)."""
    uri = store_uri(cfg, run_dir)
    if uri is None:
        return 0
    found = records(run_dir)
    try:
        with _quiet():
            client = _client(uri)
            experiment_id = _experiment(client, cfg.tracking.experiment or cfg.name, run_dir, cfg.tracking.uri is None)
            parent = _pipeline_run(client, experiment_id, cfg, run_dir)
            have = {}
            for run in _all_runs(client, experiment_id, f"tags.`{PARENT}` = '{parent}'"):
                if run.data.tags.get(COMPLETE) == "1":
                    have[run.data.tags.get(KEY)] = run.info.run_id
                else:
                    client.delete_run(run.info.run_id)
            made = [_nested(client, experiment_id, parent, rec) for rec in found if rec.key not in have]
            client.set_terminated(parent, "FINISHED")
    except Exception as exc:  # the results are on disk; the next command logs what is missing
        if cfg.tracking.uri is None:
            raise
        raise TrackingError(f"tracking.uri {cfg.tracking.uri}: logging failed ({type(exc).__name__}: {exc}); the "
                            f"results are in {run_dir} and the next command logs what is missing; or run without "
                            "tracking: --set tracking.backend=none") from None
    if made and log:
        where = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent}" if uri.startswith("http") else uri
        log(f"tracking: {len(made)} new MLflow run{'s' if len(made) > 1 else ''} "
            f"({', '.join(r.name for r in found if r.key not in have)}) -> {where}")
    return len(made)
