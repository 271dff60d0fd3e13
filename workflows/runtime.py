"""Connecting to Ray: a cluster when one is given (`ray job submit` sets RAY_ADDRESS), else a local instance."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray Train's print patch breaks datasets' fingerprinting (it dumps bytecode into the log) and doubles lines.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Actors inherit this; vLLM's per-request INFO lines would drown the progress bar.
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"), "TOKENIZERS_PARALLELISM": "false"}
    # Ray Train's placement-group cleaner (an actor) asks the State API whether its training controller still
    # lives and removes the training's placement group when the answer is no. Left to find "the" cluster by itself,
    # it can ask another Ray instance on the same machine, get "no such actor" and kill a healthy training run; so
    # every actor of this job is told which cluster (and which dashboard) is ours.
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": {**env, "RAY_ADDRESS": address}}, log_to_driver=True)
        return
    port = free_port()
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": env},
                   log_to_driver=True, configure_logging=True, logging_level="warning")
    if ctx.dashboard_url:
        print(f"[thinkbroad] Ray dashboard (progress of every stage): http://{ctx.dashboard_url}", flush=True)
