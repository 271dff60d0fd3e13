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
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True,
                 configure_logging=True, logging_level="warning")
