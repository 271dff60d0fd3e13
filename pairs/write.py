"""Writing the split files: streamed from a scan's runs, each to a temp file renamed over it when finished."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairs.canonical import PAIR_SCHEMA
from pairs.config import DataConfig
from pairs.scan import Scan
from pairs.splits import SPLITS

ROW_GROUP_BYTES = 32 << 20  # rows buffered per split file before a row group is written


def publish_file(tmp: Path, path: Path) -> None:
    """The last step of writing an output file: rename its finished temp file over it."""
    os.replace(tmp, path)


def write_splits(scan: Scan, codes: np.ndarray, paths: dict[str, Path]) -> None:
    """Stream the canonical rows into the split files (the pairs file's order within each split): each is written
    to a temp file beside it, then renamed over it."""
    tmps = {s: p.with_name(f".{p.name}.{os.getpid()}.tmp") for s, p in paths.items()}
    for p in tmps.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    writers = {s: pq.ParquetWriter(tmps[s], PAIR_SCHEMA) for s in SPLITS}
    buffers: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    start = 0
    for batch in scan.batches():
        part = codes[start:start + batch.num_rows]
        start += batch.num_rows
        rows = batch.select(PAIR_SCHEMA.names)
        for i, s in enumerate(SPLITS):
            chosen = rows.filter(pa.array(part == i))
            if chosen.num_rows:
                buffers[s].append(chosen)
                sizes[s] += chosen.nbytes
            if sizes[s] >= ROW_GROUP_BYTES:
                writers[s].write_table(pa.concat_tables(buffers[s]))
                buffers[s], sizes[s] = [], 0
    for s in SPLITS:
        if buffers[s]:
            writers[s].write_table(pa.concat_tables(buffers[s]))
        writers[s].close()
    for s in SPLITS:
        publish_file(tmps[s], paths[s])


def input_files(data: DataConfig) -> list[Path]:
    """The files a prepared split depends on: the pairs file and the joined ones."""
    return [Path(data.path)] + [Path(spec.path) for spec in (data.queries, data.products) if spec]
