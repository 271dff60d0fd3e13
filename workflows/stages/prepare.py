"""`thinkbroad prepare`: read and validate the labelled pairs (joined and filtered as configured), split them by
query -> RUN_DIR/data/{train,val,test}.parquet. The reading, joining and splitting is the pairs package."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pairs.errors import DataError
from pairs.joins import JOINED_NOUN
from pairs.scan import scan_pairs
from pairs.splits import SPLITS, split_codes, split_summary
from pairs.write import input_files, write_splits
from workflows.artifacts import fingerprint, invalidate, is_fresh, write_manifest
from workflows.config import RunConfig
from workflows.stages.common import log, log_up_to_date


def prepare(cfg: RunConfig, run_dir: Path) -> dict[str, Path]:
    """Read + validate the labelled pairs (joined and filtered as configured), split by query, write
    RUN_DIR/data/{train,val,test}.parquet. Streams: memory is bounded by the batch, not by the input."""
    out = run_dir / "data"
    paths = {s: out / f"{s}.parquet" for s in SPLITS}
    files = input_files(cfg.data)
    src = files[0]
    inputs = {str(f): fingerprint(f) for f in files if f.exists()}
    key = cfg.section_hash("data", "labels")
    if len(inputs) == len(files) and is_fresh(out, key, inputs):
        log_up_to_date("prepare", out)
        return paths
    t0 = time.time()
    codes_of_labels = [lab.name for lab in cfg.labels]
    with tempfile.TemporaryDirectory(prefix="thinkbroad-prepare-") as work:
        scan = scan_pairs(cfg.data, codes_of_labels, Path(work))
        codes = split_codes(scan.index, cfg.data.split, src)
        counts, queries, support = split_summary(scan.index, codes, codes_of_labels)
        empty = [name for name in SPLITS if not counts[name]]
        if empty:
            frac = cfg.data.split
            raise DataError(
                f"{src}: data.split (train {frac.train:g}, val {frac.val:g}, test {frac.test:g}) leaves {' and '.join(empty)} "
                "empty (" + ", ".join(f"{k} {counts[k]} pairs in {queries[k]} queries" for k in SPLITS) + "); later stages "
                "need all three (train: generation and training, val: early stopping, test: teacher eval and student "
                "metrics): give each split a fraction above 0, e.g. 0.8/0.1/0.1, and use data with at least 3 queries"
            )
        invalidate(out)  # from here on the old splits are being replaced: never "up to date" until the manifest is back
        write_splits(scan, codes, paths)
    present = {c for s in support.values() for c, n in s.items() if n}
    warnings = [f"label {c} has no pair in the {name} split ({sum(s[c] for s in support.values())} in the data); "
                f"{'early stopping and model selection' if name == 'val' else 'test metrics'} cannot see it"
                for name in ("val", "test") for c in sorted(present) if not support[name][c]]
    read = {"rows_read": scan.rows_read, "filtered_out": scan.filtered_out, "missing_dropped": scan.missing_dropped,
            "joined_duplicate_keys": scan.joined_duplicates,
            "test_split": f"{cfg.data.split.column} == {cfg.data.split.test_value!r}" if cfg.data.split.column else "by query"}
    write_manifest(out, "prepare", key, inputs, t0, rows=counts, queries=queries, label_support=support, warnings=warnings,
                   input_rows=read)
    total = scan.index.num_rows
    dropped = "".join(f", {n} without a {JOINED_NOUN[name]} dropped" for name, n in scan.missing_dropped.items())
    filtered = f" ({scan.filtered_out} of {scan.rows_read} rows filtered out{dropped})" if scan.filtered_out or dropped else ""
    log(f"prepare: {total} pairs{filtered} -> " + ", ".join(f"{k} {v} ({queries[k]} queries)" for k, v in counts.items()))
    for name, s in support.items():
        log(f"prepare: {name} labels " + " ".join(f"{c}={n}" for c, n in s.items()))
    for w in warnings:
        log(f"prepare: WARNING: {w}")
    return paths
