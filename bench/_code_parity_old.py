"""Run by bench/code_parity.py under the OLD code (PYTHONPATH=<old tree>, cwd=<old tree>): give the old run its split
and the new run's teacher targets, with manifests in the old code's own hashing so its prepare and targets stages are
up to date. Arguments: OLD_RUN NEW_RUN TEACHER_MODEL [SPLITS TARGETS PROBE].

Without SPLITS: the old code splits the data itself, checked to be the new run's pair for pair, and the targets are the
new run's. With SPLITS (a folder of train/val/test.parquet: one cross-validation fold) and TARGETS (that fold's view
of the targets, a Parquet file or folder) and PROBE (the targets' probe.json): the old run is given that fold's
split and targets."""
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
fold = Path(sys.argv[4]) if len(sys.argv) > 4 else None
cfg = load_config("configs/local.yaml", [f"distill.teacher={teacher}"])
src = new_run / "student" / "targets" / "teacher"
if fold is None:
    splits = stages.prepare(cfg, old_run)
    for s, path in splits.items():
        a, b = (pq.read_table(p, columns=["pair_id", "label"]) for p in (path, new_run / "data" / f"{s}.parquet"))
        if not a.equals(b):
            raise SystemExit(f"the old code's {s} split differs from {new_run}'s: not the same pairs; nothing to compare")
    target_file, probe = src / "targets.parquet", src / "probe.json"
else:  # the fold's split, with a prepare manifest in the old hashing (the data file and the data/labels sections)
    data = old_run / "data"
    data.mkdir(parents=True, exist_ok=True)
    splits = {s: data / f"{s}.parquet" for s in ("train", "val", "test")}
    for s, path in splits.items():
        shutil.copy(fold / f"{s}.parquet", path)
    source = Path(cfg.data.path)
    write_manifest(data, "prepare", cfg.section_hash("data", "labels"), {str(source): fingerprint(source)}, time.time(),
                   rows={s: pq.ParquetFile(p).metadata.num_rows for s, p in splits.items()})
    target_file, probe = Path(sys.argv[5]), Path(sys.argv[6])
out = old_run / "student" / "targets" / "teacher"
out.mkdir(parents=True, exist_ok=True)
table = pq.read_table(target_file)
col = table.schema.get_field_index("embedding")  # the old code wrote a variable-size list; it reads either
table = table.set_column(col, "embedding", table.column("embedding").cast(pa.list_(pa.float32())))
pq.write_table(table, out / "targets.parquet")
shutil.copy(probe, out / "probe.json")
inputs = {"train": fingerprint(splits["train"]), "val": fingerprint(splits["val"]), "teacher": fingerprint(teacher)}
write_manifest(out, "targets", targets_key(cfg, teacher, "teacher"), inputs, time.time(), rows=table.num_rows,
               source="teacher", teacher=teacher, embedder=cfg.distill.embedder, probe=json.loads(probe.read_text()))
print(f"[code_parity] old run {old_run}: {'fold ' + fold.name if fold else 'the same split as ' + str(new_run)}; "
      f"{table.num_rows} teacher targets copied")
