"""Connecting to Ray: a cluster when one is given (`ray job submit` sets RAY_ADDRESS), else a local instance."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray Train's controller polls its worker group this often (seconds)
HEALTH_CHECK = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_HEALTH_CHECK_S = "0.25"


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
        if HEALTH_CHECK in os.environ:  # the user's choice reaches the controllers; else the cluster's own setting
            env[HEALTH_CHECK] = os.environ[HEALTH_CHECK]
        _init(ray, address, runtime_env={"env_vars": {**env, "RAY_ADDRESS": address}}, log_to_driver=True)
        _reclaim_signals()
        return
    port = free_port()
    # a training run's controller sees its workers finish at its next poll (Ray's default: every 2 s, twice per run:
    # the workers' end, then the group's shutdown); a local instance has a handful of workers to poll
    env[HEALTH_CHECK] = os.environ.get(HEALTH_CHECK, LOCAL_HEALTH_CHECK_S)
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # "local": always a new instance of our own; address=None would join a `ray start` cluster running on this
    # machine (another user's, or a test's) whose CPUs its own work may hold
    ctx = _init(ray, "local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=True, logging_level="warning")
    _reclaim_signals()
    if ctx.dashboard_url:
        print(f"[thinkbroad] Ray dashboard (progress of every stage): http://{ctx.dashboard_url}", flush=True)


# ---- Ctrl-C and SIGTERM: one way out of every stage (workflows/cli.py) ----

class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread wherever the stage is, like Ctrl-C's KeyboardInterrupt
    (libraries that clean up on KeyboardInterrupt do so for SIGTERM too)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_installed = False
# the signal that stopped this process: Ray's `ray.get` turns Stopped into a plain KeyboardInterrupt (its core worker
# reports "interrupted"), so the signal is kept here too
stopped_by: int | None = None


def _raise_stopped(signum, frame):
    global stopped_by
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal while stopping would interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    stopped_by = signum
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise Stopped in the main thread, for the rest of the process. Ray's `ray.init` sets its
    own SIGTERM handler (sys.exit) and Ray Train's `fit` its own SIGINT handler (which exits 0 on a second Ctrl-C
    after the run is gone), so `ensure_ray` takes both back and Ray Train's is not installed."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    _installed = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stopped)


def _reclaim_signals() -> None:
    """Our handlers again after ray.init replaced SIGTERM's, and Ray Train's SIGINT handler off (Ray Train is imported
    here, once Ray is up, not at the start of every command)."""
    if not _installed:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stopped)
    try:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:  # another Ray Train version: its handler, if any, stays
        return
    DataParallelTrainer._register_sigint_handler = lambda self, controller: None


def stop_ray() -> None:
    """Disconnect from Ray (a local instance of ours stops; on a cluster, this job's actors and tasks end)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    held = [(sig, signal.signal(sig, signal.SIG_IGN)) for sig in (signal.SIGINT, signal.SIGTERM)] if main else []
    try:  # a signal now would leave Ray half shut down
        ray.shutdown()
    finally:
        for sig, handler in held:
            signal.signal(sig, handler)
