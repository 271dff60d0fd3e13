"""Run by bench/code_parity.py under the OLD code (PYTHONPATH=<old tree>, cwd=<old tree>): prepare the split and give
the old run the new run's teacher targets, with a manifest in the old code's own hashing so its targets stage is up
to date; checks the split is the new run's, pair for pair. Arguments: OLD_RUN NEW_RUN TEACHER_MODEL."""
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflows import stages
from workflows.config import load_config
from workflows.student_stages import fingerprint, targets_key, write_manifest

old_run, new_run, teacher = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = load_config("configs/local.yaml", [f"distill.teacher={teacher}"])
splits = stages.prepare(cfg, old_run)
for s, path in splits.items():
    a, b = (pq.read_table(p, columns=["pair_id", "label"]) for p in (path, new_run / "data" / f"{s}.parquet"))
    if not a.equals(b):
        raise SystemExit(f"the old code's {s} split differs from {new_run}'s: not the same pairs; nothing to compare")
src, out = new_run / "student" / "targets" / "teacher", old_run / "student" / "targets" / "teacher"
out.mkdir(parents=True, exist_ok=True)
table = pq.read_table(src / "targets.parquet")
col = table.schema.get_field_index("embedding")  # the old code wrote a variable-size list; it reads either
table = table.set_column(col, "embedding", table.column("embedding").cast(pa.list_(pa.float32())))
pq.write_table(table, out / "targets.parquet")
shutil.copy(src / "probe.json", out / "probe.json")
inputs = {"train": fingerprint(splits["train"]), "val": fingerprint(splits["val"]), "teacher": fingerprint(teacher)}
write_manifest(out, "targets", targets_key(cfg, teacher, "teacher"), inputs, time.time(), rows=table.num_rows,
               source="teacher", teacher=teacher, embedder=cfg.distill.embedder,
               probe=json.loads((src / "probe.json").read_text()))
print(f"[code_parity] old run {old_run}: same split as {new_run}; {table.num_rows} teacher targets copied")
