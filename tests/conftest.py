import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mpcot.labels import DEFAULT_ESCI_LABELS, Label  # noqa: E402


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


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for a test module, shut down at its end (Ray-heavy modules run one at a time)."""
    import ray

    from workflows.runtime import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()
