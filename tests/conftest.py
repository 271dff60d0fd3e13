import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the clusters the tests start themselves (`ray start`, ray.cluster_utils) poll training workers as a local instance
# does (hardware/runtime.py); their drivers pass it on to the training controllers
from hardware.runtime import HEALTH_CHECK, LOCAL_HEALTH_CHECK_S  # noqa: E402

os.environ.setdefault(HEALTH_CHECK, LOCAL_HEALTH_CHECK_S)

from mpcot.labels import DEFAULT_ESCI_LABELS, Label  # noqa: E402

# Tiers: `make test` runs every test (CI); `make test-fast` deselects the markers `ray` (starts Ray), `vllm` (starts
# a vLLM engine) and `slow`. `ray` and `vllm` are declared in pyproject.toml; `slow` here, because a change to
# pyproject.toml makes the next `make` reinstall the environment.


def pytest_terminal_summary(terminalreporter):
    """The host a run's times belong to, printed under the durations even with -q (the README quotes suite times with
    it): the CPU line of hardware/cpu.py and the load average the run ended with."""
    from hardware.cpu import cpu_info

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    terminalreporter.write_line(f"host: {cpu_info().describe()}; load average (1/5/15 min) {load}")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~30 s on 2 cores without Ray or vLLM (left out of `make test-fast`)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A test that starts Ray in this process must say so (`ray` marker), or `make test-fast` would start Ray."""
    started_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if item.get_closest_marker("ray") is None and not started_before and "ray" in sys.modules \
            and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{item.nodeid} started Ray without @pytest.mark.ray (the marker keeps it out of make test-fast)")


@pytest.fixture
def labels():
    return [Label(**lab) for lab in DEFAULT_ESCI_LABELS]


@pytest.fixture(scope="session")
def tiny_qwen2():
    from workflows.models import TINY_QWEN2, resolve_model

    return resolve_model(TINY_QWEN2)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(i: int, query_id: str | None = None, label: str = "E", **extra) -> dict:
    row = {
        "pair_id": f"p{i}",
        "query_id": query_id or f"q{i // 2}",
        "query": f"query {i // 2}",
        "product_id": f"B{i:04d}",
        "product_title": f"product {i}",
        "label": label,
    }
    row.update(extra)
    return row


@pytest.fixture(scope="session")
def _ray_session():
    """The local Ray instance `ray_local` shares between test modules (a start costs 5-20 s on 2 cores)."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """A local Ray instance for a test module (Ray-heavy modules run one at a time): the session's, started by the
    first module that asks or again after a test shut it down. A module that leaves CPUs held (an actor or a training
    run a failed test left behind) hands the next module a fresh instance rather than one that would wait forever."""
    import ray

    from hardware.runtime import ensure_ray

    ensure_ray()
    yield ray
    if ray.is_initialized():
        deadline = time.time() + 15
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
            if time.time() > deadline:
                ray.shutdown()
                break
            time.sleep(0.5)
