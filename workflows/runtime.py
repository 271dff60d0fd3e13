"""Connecting to Ray: a cluster when one is given (`ray job submit` sets RAY_ADDRESS), else a local instance."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayStartError(RuntimeError):
    """Ray did not start (or the cluster could not be reached); the message says what to try."""


def _init(ray, address: str | None, **kwargs):
    """ray.init, with a failure turned into one RayStartError line: Ray raises a bare Exception
    ("The current node timed out during startup ...") when the machine is too loaded to start its processes."""
    try:
        return ray.init(address=address, **kwargs)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if address and address != "local":
            raise RayStartError(f"could not connect to the Ray cluster at {address} ({reason}); check that it is up "
                                f"(`ray status --address {address}`) and that RAY_ADDRESS and RAY_AUTH_TOKEN are right, "
                                "then run the same command again") from exc
        raise RayStartError(f"Ray could not start on this machine ({reason}); this happens when memory or CPU is short "
                            "or other Ray instances are running: stop them (`ray stop` stops the ones you started), "
                            "free memory, then run the same command again (finished work is kept)") from exc


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, else start a local Ray instance (once per process); raises
    RayStartError when neither works."""
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
        _init(ray, address, runtime_env={"env_vars": {**env, "RAY_ADDRESS": address}}, log_to_driver=True)
        return
    port = free_port()
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # "local": always a new instance of our own; address=None would join a `ray start` cluster running on this
    # machine (another user's, or a test's) whose CPUs its own work may hold
    ctx = _init(ray, "local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=True, logging_level="warning")
    if ctx.dashboard_url:
        print(f"[thinkbroad] Ray dashboard (progress of every stage): http://{ctx.dashboard_url}", flush=True)
