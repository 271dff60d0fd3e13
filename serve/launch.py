"""Starting the Serve application locally, and the config for `serve deploy` on a cluster."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

from serve.config import ServeConfig


def find_student(path: str | Path) -> Path:
    """A student folder, or a run dir: then the LRKD variant (lambda > 0) with the best mean validation macro-F1 in
    student/metrics.json, and its seed with the best validation macro-F1. Test metrics never enter the choice."""
    path = Path(path)
    if (path / "student_config.json").exists():
        return path
    metrics = path / "student" / "metrics.json"
    if not metrics.exists():
        raise FileNotFoundError(f"{path} is neither a student folder (student_config.json) nor a run dir with "
                                "student/metrics.json; run `thinkbroad distill` first or pass a student folder")
    report = json.loads(metrics.read_text())
    runs = [r for r in report["runs"] if "val" in r["metrics"]]
    if not runs:
        raise FileNotFoundError(f"{metrics} has no validation metrics (written by an older thinkbroad); rerun "
                                "`thinkbroad distill` or pass a student folder")
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    lrkd = {k: v for k, v in by_variant.items() if k.startswith("lrkd") and not k.endswith("-lam0")} or by_variant
    best = max(lrkd, key=lambda k: sum(r["metrics"]["val"]["macro_f1"] for r in lrkd[k]) / len(lrkd[k]))
    seed = max(lrkd[best], key=lambda r: r["metrics"]["val"]["macro_f1"])["seed"]
    return path / "student" / "variants" / f"{best}-seed{seed}" / "best"


def run_split(student_dir: Path, split: str = "val") -> Path | None:
    """RUN/data/<split>.parquet of the run a student folder lies in (RUN/student/variants/NAME/best), if any."""
    for parent in list(Path(student_dir).resolve().parents)[:4]:
        if (parent / "data" / f"{split}.parquet").exists():
            return parent / "data" / f"{split}.parquet"
    return None


def ensure_export(student_dir: Path, settings: ServeConfig) -> dict | None:
    """Before serving on CPU: export the student (fp32 + int8) unless a current export is in its folder.

    Parity is checked on the validation split of the run the student belongs to (choosing a precision is a choice
    like choosing the student: test metrics stay out of it); without labelled pairs neither int8 nor bf16 is
    judged and `auto` serves onnxruntime fp32. Returns the export report, None when the settings name a
    path that needs none (GPU, or torch with an explicit precision).
    """
    import pyarrow.parquet as pq

    from serve.scorer import resolve_path
    from student.export import check_set, export_onnx, export_status, summarize

    device = resolve_path(settings.device, settings.backend, settings.precision, None)[0]  # rejects what cannot run
    if device != "cpu" or (settings.backend == "torch" and settings.precision != "auto"):
        return None  # the export (and its parity rows) only matter for onnxruntime and for choosing a CPU path
    report = export_status(student_dir)
    if report is not None:
        return report
    val = run_split(student_dir, "val")
    pairs, labels = check_set(pq.read_table(val)) if val is not None else (None, None)
    print(f"[thinkbroad] exporting {student_dir} to ONNX (fp32 + int8) and checking each path's parity "
          f"({'on ' + str(val) if val else 'no labelled pairs: int8 and bf16 not judged'}) ...", flush=True)
    report = export_onnx(student_dir, quantize=True, check_pairs=pairs, check_labels=labels)
    print(summarize(report), flush=True)
    from student.card import refresh_card

    refresh_card(student_dir)  # its model card states the export
    return report


def http_options(settings: ServeConfig) -> dict:
    """Ray Serve's proxy options: the bind address and the request timeout derived from the latency budget."""
    options = {"host": settings.host, "port": settings.port}
    if settings.timeout_s() is not None:
        options["request_timeout_s"] = settings.timeout_s()
    return options


def check_api_key(settings: ServeConfig) -> None:
    """With serve.api_key_env set, its variable must hold a key here: local replicas inherit this environment."""
    if settings.api_key_env and not os.environ.get(settings.api_key_env):
        raise ValueError(f"serve.api_key_env is {settings.api_key_env}, but that environment variable is empty or not "
                         "set; export it (the key clients send as `Authorization: Bearer <key>`) and start again")


def serve_deploy_config(student_dir: Path, settings: ServeConfig) -> str:
    """YAML for `serve deploy` (the student folder must be readable at that path on the cluster's nodes)."""
    return yaml.safe_dump({
        "proxy_location": "EveryNode",
        "http_options": http_options(settings),
        "applications": [{
            "name": "thinkbroad",
            "route_prefix": "/",
            "import_path": "serve.app:build_app",
            "args": {"student_dir": str(student_dir.resolve()), "settings": settings.model_dump()},
        }],
    }, sort_keys=False)


def surge_fits(settings: ServeConfig) -> tuple[bool, str]:
    """Whether the extra replicas of serve.max_surge_percent can be placed now: per node, for every resource a
    replica asks for (ray_actor_options: CPUs, GPUs), counted on what each node has free, not cluster-wide (a GPU
    host whose GPUs are busy cannot take a GPU replica, whatever its free CPUs)."""
    import ray

    extra = math.ceil(settings.max_surge_percent * settings.max_replicas() / 100)
    need = {r: q for r, q in (("CPU", settings.num_cpus), ("GPU", settings.num_gpus)) if q > 0}
    if not need or not extra:
        return True, ""
    try:
        from ray._private.state import available_resources_per_node  # what Ray's own placement helpers read

        nodes = available_resources_per_node()
    except Exception:  # no per-node view: the cluster's total, the best there is
        nodes = {"cluster": ray.available_resources()}
    fits = sum(min(int((free.get(r, 0.0) + 1e-6) // q) for r, q in need.items()) for free in nodes.values())
    return fits >= extra, (f"the {extra} extra replica(s) of serve.max_surge_percent need {need} each; the nodes have "
                           f"room for {fits}")


def deploy(student_dir: Path, settings: ServeConfig, name: str = "thinkbroad", route_prefix: str = "/") -> tuple:
    """Deploy the app on the running Serve instance and wait until it serves; on an app already running under
    `name` this is a redeploy: new replicas start (serve.max_surge_percent) and the old ones finish what they hold
    before they stop. Where the surge replicas cannot be placed, or have not started within
    serve.surge_timeout_s, the replicas are replaced one after another instead. Returns the (device, backend,
    precision) path; raises when the new version fails to start."""
    import threading

    from ray import serve

    from serve.app import build_app
    from serve.scorer import resolve_path

    path = resolve_path(settings.device, settings.backend, settings.precision, ensure_export(student_dir, settings))

    def run(s: ServeConfig):
        return serve.run(build_app({"student_dir": str(student_dir), "settings": s.model_dump()}), name=name,
                         route_prefix=route_prefix)

    one_by_one = settings.model_copy(update={"max_surge_percent": 0})
    if not settings.max_surge_percent or name not in serve.status().applications:
        run(settings)
        return path
    fits, why = surge_fits(settings)
    if not fits:
        print(f"[thinkbroad] redeploy: {why}; replacing the replicas one after another instead (as with "
              "serve.max_surge_percent 0: with one replica, requests wait for the new one)", flush=True)
        run(one_by_one)
        return path
    outcome: dict = {}

    def surge():
        try:
            outcome["handle"] = run(settings)
        except Exception as exc:  # the new version failed to start
            outcome["error"] = exc

    th = threading.Thread(target=surge, daemon=True)
    th.start()
    th.join(settings.surge_timeout_s)
    if "error" in outcome:
        raise outcome["error"]
    if th.is_alive():  # placed on paper, not started (resources taken meanwhile): one by one
        print(f"[thinkbroad] redeploy: the surge replicas did not start within {settings.surge_timeout_s:g} s "
              "(serve.surge_timeout_s); replacing the replicas one after another instead", flush=True)
        run(one_by_one)
    return path


def run_local(student_dir: Path, settings: ServeConfig, block: bool = True, reload=None, name: str = "thinkbroad",
              route_prefix: str = "/") -> str:
    """Start Serve and the app, say "ready" once it answers; with `block`, serve until SIGTERM/SIGINT, redeploying
    on SIGHUP (serve/supervise.py). Returns the base URL."""
    from serve.supervise import run_local as run

    return run(student_dir, settings, block, reload, name, route_prefix)
