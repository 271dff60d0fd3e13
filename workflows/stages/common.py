"""What every stage uses: its log line, the run folder, and a heavy pass run as a Ray task. A stage's freshness
(config keys, input fingerprints, manifests, resumable attempts) is workflows/artifacts.py."""
from __future__ import annotations

from pathlib import Path

from workflows.config import RunConfig


def log(msg: str) -> None:
    print(f"[thinkbroad] {msg}", flush=True)


_SAID_FRESH: set[str] = set()


def log_up_to_date(what: str, out) -> None:
    """`<what>: up to date (<out>)`, once per process: each stage checks the stages it reads before it runs, so one
    `thinkbroad run` would repeat the same check (the distill stage alone checked prepare three times); the first
    check of a folder says it, the rest stay silent."""
    line = f"{what}: up to date ({out})"
    if line not in _SAID_FRESH:
        _SAID_FRESH.add(line)
        log(line)


def run_dir_for(cfg: RunConfig, override: str | None) -> Path:
    return Path(override or cfg.run_dir or f"runs/{cfg.name}")


def remote(fn):
    """Run `fn` as a Ray task (heavy passes over targets stay off the driver); returns a caller that waits."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return lambda *args, **kwargs: ray.get(task.remote(*args, **kwargs))
