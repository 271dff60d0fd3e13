"""Starting the Serve application locally, and the config for `serve deploy` on a cluster."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from serve.config import ServeConfig


def find_student(path: str | Path) -> Path:
    """A student folder, or a run dir whose student/metrics.json names the best LRKD variant (by mean macro-F1)."""
    path = Path(path)
    if (path / "student_config.json").exists():
        return path
    metrics = path / "student" / "metrics.json"
    if not metrics.exists():
        raise FileNotFoundError(f"{path} is neither a student folder (student_config.json) nor a run dir with "
                                "student/metrics.json; run `thinkbroad distill` first or pass a student folder")
    report = json.loads(metrics.read_text())
    lrkd = {k: v for k, v in report["variants"].items() if k.startswith("lrkd")} or report["variants"]
    best = max(lrkd, key=lambda k: lrkd[k]["macro_f1"]["mean"])
    runs = [r for r in report["runs"] if r["variant"] == best]
    seed = max(runs, key=lambda r: r["metrics"]["macro_f1"])["seed"]
    return path / "student" / "variants" / f"{best}-seed{seed}" / "best"


def serve_deploy_config(student_dir: Path, settings: ServeConfig) -> str:
    """YAML for `serve deploy` (the student folder must be readable at that path on the cluster's nodes)."""
    return yaml.safe_dump({
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [{
            "name": "thinkbroad",
            "route_prefix": "/",
            "import_path": "serve.app:build_app",
            "args": {"student_dir": str(student_dir.resolve()), "settings": settings.model_dump()},
        }],
    }, sort_keys=False)


def run_local(student_dir: Path, settings: ServeConfig, block: bool = True) -> str:
    """Start Serve on the current Ray (local unless RAY_ADDRESS is set) and return the base URL."""
    import time

    from ray import serve

    from serve.app import build_app
    from workflows.runtime import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app({"student_dir": str(student_dir), "settings": settings.model_dump()}), name="thinkbroad", route_prefix="/")
    url = f"http://{settings.host}:{settings.port}"
    print(f"[thinkbroad] serving {student_dir} at {url}  (POST {url}/v1/relevance, docs at {url}/docs; Ctrl-C stops)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
