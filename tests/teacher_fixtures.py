"""Hand-made teacher training tables on real ESCI pairs (no generation needed), and a subprocess entry point."""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpcot.labels import DEFAULT_ESCI_LABELS, Label  # noqa: E402
from mpcot.perspectives import DEFAULT_PERSPECTIVES, NEUTRAL_PERSPECTIVE, Perspective  # noqa: E402
from mpcot.prompts import build_messages, format_completion  # noqa: E402

LABELS = [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
TITLE = {lab.name: lab.title for lab in LABELS}
MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _pairs(n):
    rows = [json.loads(line) for line in (ROOT / "data" / "esci_us_subset.jsonl").read_text().splitlines()[:n]]
    return [{"query": r["query"], "title": r["product_title"], "attributes": {}, "label": r["label"]} for r in rows]


def write_sft(path: Path, n: int = 12) -> Path:
    persp = [Perspective(**p) for p in DEFAULT_PERSPECTIVES]
    rows = []
    for i, p in enumerate(_pairs(n)):
        why = f"The query asks for {p['query']}; the product is {p['title'][:40]}."
        rows.append({"prompt": build_messages(p, persp[i % 3], LABELS),
                     "completion": [{"role": "assistant", "content": format_completion(why, TITLE[p["label"]], "json")}]})
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("prompt", MSG), ("completion", MSG)])), path)
    return path


def write_dpo(path: Path, n: int = 12) -> Path:
    rows = []
    for p in _pairs(n):
        wrong = "I" if p["label"] != "I" else "E"
        rows.append({
            "prompt": build_messages(p, NEUTRAL_PERSPECTIVE, LABELS),
            "chosen": [{"role": "assistant", "content": format_completion("It matches what the shopper asked for.", TITLE[p["label"]], "json")}],
            "rejected": [{"role": "assistant", "content": format_completion("Unrelated to the query.", TITLE[wrong], "json")}],
        })
    schema = pa.schema([("prompt", MSG), ("chosen", MSG), ("rejected", MSG)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


if __name__ == "__main__":
    # python tests/teacher_fixtures.py JOB.json : run one training job on a fresh local Ray (used to kill it midway)
    from teacher.train import TrainJob, train_teacher
    from hardware.runtime import ensure_ray

    ensure_ray()
    train_teacher(TrainJob(**json.loads(Path(sys.argv[1]).read_text())))
