"""Connecting to Ray: a cluster when one is given (`ray job submit` sets RAY_ADDRESS), else a local instance."""
from __future__ import annotations

import os


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray Train's print patch breaks datasets' fingerprinting (it dumps bytecode into the log) and doubles lines.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Actors inherit this; vLLM's per-request INFO lines would drown the progress bar.
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"), "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # With the dashboard (bound to 127.0.0.1) the State API works: Ray Train's placement-group cleaner polls it
        # and, without it, logs a warning every second for the rest of the run.
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": env},
                       log_to_driver=True, configure_logging=True, logging_level="warning")
        if ctx.dashboard_url:
            print(f"[thinkbroad] Ray dashboard (progress of every stage): http://{ctx.dashboard_url}", flush=True)
