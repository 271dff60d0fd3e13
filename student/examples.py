"""Building the student's examples tables (student/data.py's columns) with Ray Data: a split's pairs, left-joined by
pair_id with the sparse rationale targets (one row per (pair, perspective) that has one) pivoted to one row per
pair. Written once per target source as a Parquet folder that every variant, seed and epoch then streams.

Nothing here holds a split in one process: Ray Data reads, shuffles by pair id, joins and writes in blocks.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from student.data import PAIR_COLUMNS, fixed_list, pair_rows
from pairs.parquet import batches

TARGET_READ = ["pair_id", "perspective", "split", "embedding", "predicted_label", "parse_ok", "correct"]
PROBE = "probe.parquet"
SUMMARY = "summary.json"


def keep_mask(batch: pa.Table, target_filter: str) -> np.ndarray:
    """correct: the rationale's label is the gold label (the SFT consistency rule); parsed: any parsed answer; all."""
    if target_filter == "all":
        return np.ones(batch.num_rows, bool)
    ok = batch.column("parse_ok").to_numpy(zero_copy_only=False).astype(bool)
    if target_filter == "parsed":
        return ok
    return ok & batch.column("correct").to_numpy(zero_copy_only=False).astype(bool)


def _split_rows(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch.column("split"), split))


def _pivot(block: pa.Table, perspectives: list[str], codes: list[str], target_filter: str, targets: bool,
           votes: bool) -> pa.Table:
    """All target rows of some pairs (a hash partition: every row of a pair is in it) -> one row per pair:
    targets (K * D, zeros where the filter kept no rationale), target_mask (K), votes (K, the parsed label index
    or -1)."""
    k = len(perspectives)
    pidx = {p: i for i, p in enumerate(perspectives)}
    persp = block.column("perspective").to_pylist()
    rows = np.array([pidx.get(p, -1) for p in persp])
    block, rows = block.filter(pa.array(rows >= 0)), rows[rows >= 0]
    ids = block.column("pair_id").combine_chunks()
    uniq = pc.unique(ids)
    pos = pc.index_in(ids, value_set=uniq).to_numpy()
    n = len(uniq)
    cols = {"pair_id": uniq}
    if targets:
        emb = block.column("embedding").combine_chunks()
        d = emb.type.list_size
        vecs = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
        keep = keep_mask(block, target_filter)
        tgt, mask = np.zeros((n, k, d), np.float32), np.zeros((n, k), np.float32)
        tgt[pos[keep], rows[keep]] = vecs[keep]
        mask[pos[keep], rows[keep]] = 1.0
        cols |= {"targets": fixed_list(tgt, k * d), "target_mask": fixed_list(mask, k)}
    if votes:
        index = {c: i for i, c in enumerate(codes)}
        ok = block.column("parse_ok").to_numpy(zero_copy_only=False).astype(bool)
        lab = np.array([index.get(x, -1) if o else -1 for x, o in zip(block.column("predicted_label").to_pylist(), ok)], np.int8)
        v = np.full((n, k), -1, np.int8)
        v[pos, rows] = lab
        cols["votes"] = fixed_list(v, k)
    return pa.table(cols)


def _dense(col: pa.ChunkedArray, width: int, fill, dtype) -> pa.FixedSizeListArray:
    """A joined fixed_size_list column whose missing rows (pairs without targets: null) become `fill`."""
    arr = col.combine_chunks()
    if arr.null_count == 0:
        return arr
    values = arr.values.slice(arr.offset * width, len(arr) * width).to_numpy(zero_copy_only=False).astype(dtype).reshape(len(arr), width)
    values[~arr.is_valid().to_numpy(zero_copy_only=False)] = fill
    return fixed_list(values, width)


def _fill(batch: pa.Table, widths: dict[str, tuple[int, object]]) -> pa.Table:
    for name, (width, fill) in widths.items():
        dtype = np.int8 if name == "votes" else np.float32
        batch = batch.set_column(batch.schema.get_field_index(name), name, _dense(batch.column(name), width, fill, dtype))
    return batch


def input_bytes(paths: list[str | Path]) -> int:
    return sum(f.stat().st_size for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*.parquet")))


def _partitions(paths: list[str | Path], target_bytes: int = 64 << 20) -> int:
    """Hash partitions for a shuffle: about 64 MB of Parquet each, at least 2."""
    return max(2, math.ceil(input_bytes(paths) / target_bytes))


# Inputs (split files + targets) up to this many bytes of Parquet are built in one Ray task: below it a Ray Data
# shuffle's fixed cost (aggregator actors, tens of seconds on 2 cores) is most of the work.
LOCAL_BYTES = 64 << 20
ONE_TASK_FILES = 16


def target_dim(targets_path: str | Path) -> int:
    return pq.read_schema(next(iter(sorted(Path(targets_path).rglob("*.parquet")))) if Path(targets_path).is_dir()
                          else targets_path).field("embedding").type.list_size


def _tag(batch: pa.Table, codes: list[str], split: str) -> pa.Table:
    rows = pair_rows(batch, codes)
    return rows.append_column("split", pa.array([split] * rows.num_rows, pa.string()))


def _widths(k: int, d: int, targets: bool, votes: bool) -> dict[str, tuple[int, object]]:
    return ({"targets": (k * d, 0.0), "target_mask": (k, 0.0)} if targets else {}) | ({"votes": (k, -1)} if votes else {})


def _examples_in_one_task(split_paths: dict[str, str], tmp: str, codes: list[str], perspectives: list[str],
                          targets_path: str | None, target_filter: str, targets: bool, votes: bool) -> dict[str, int]:
    """write_examples for small inputs, in one process: every target row pivoted at once, each split joined to it
    by a pair-id lookup (Arrow's hash join does not carry list columns), written in up to 16 files per split."""
    per_pair, widths = None, {}
    if targets_path is not None and (targets or votes):
        columns = TARGET_READ if targets else [c for c in TARGET_READ if c != "embedding"]
        files = [targets_path] if Path(targets_path).is_file() else sorted(Path(targets_path).rglob("*.parquet"))
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        per_pair = _pivot(table, perspectives, codes, target_filter, targets, votes)
        widths = _widths(len(perspectives), target_dim(targets_path), targets, votes)
    rows = {}
    for split, path in split_paths.items():
        ex = pair_rows(pq.read_table(path, columns=PAIR_COLUMNS), codes)
        if per_pair is not None:
            found = per_pair.drop_columns(["pair_id"]).take(pc.index_in(ex.column("pair_id"), value_set=per_pair.column("pair_id")))
            for name in found.column_names:
                ex = ex.append_column(name, found.column(name))
            ex = _fill(ex, widths)
        (Path(tmp) / split).mkdir(parents=True, exist_ok=True)
        step = max(1, math.ceil(ex.num_rows / ONE_TASK_FILES))  # blocks enough to share among the training workers
        for i, start in enumerate(range(0, max(ex.num_rows, 1), step)):
            pq.write_table(ex.slice(start, step), Path(tmp) / split / f"part-{i:05d}.parquet")
        rows[split] = ex.num_rows
    return rows


def write_examples(split_paths: dict[str, str | Path], out_dir: str | Path, codes: list[str], perspectives: list[str],
                   targets_path: str | Path | None = None, target_filter: str = "correct", targets: bool = True,
                   votes: bool = False, local_bytes: int = LOCAL_BYTES) -> dict[str, int]:
    """Each split's pairs as examples (+ the targets/votes of `targets_path`'s rows of those pairs) -> the Parquet
    folders `out_dir/<split>/`, in one Ray Data pipeline (one shuffle for all splits; written beside, then renamed).
    Returns the rows of each split. Inputs up to `local_bytes` of Parquet are built in one Ray task instead
    (the same rows; the split's own order)."""
    import ray

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if input_bytes([*split_paths.values(), *([targets_path] if targets_path is not None else [])]) <= local_bytes:
        task = ray.remote(num_cpus=1)(_examples_in_one_task)
        rows = ray.get(task.remote({s: str(p) for s, p in split_paths.items()}, str(tmp), codes, perspectives,
                                   None if targets_path is None else str(targets_path), target_filter, targets, votes))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return rows
    parts = [ray.data.read_parquet(str(Path(p).resolve())).select_columns(PAIR_COLUMNS).map_batches(
        _tag, fn_kwargs={"codes": codes, "split": split}, batch_format="pyarrow") for split, p in split_paths.items()]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if targets_path is not None and (targets or votes):
        k, d = len(perspectives), target_dim(targets_path)
        n_parts = _partitions([*split_paths.values(), targets_path])
        columns = TARGET_READ if targets else [c for c in TARGET_READ if c != "embedding"]
        per_pair = ray.data.read_parquet(str(Path(targets_path).resolve())).select_columns(columns).repartition(
            n_parts, keys=["pair_id"]).map_batches(  # as Ray's own map_groups: a whole hash partition per call
            _pivot, fn_kwargs={"perspectives": perspectives, "codes": codes, "target_filter": target_filter,
                               "targets": targets, "votes": votes}, batch_size=None, batch_format="pyarrow")
        ds = ds.join(per_pair, "left_outer", num_partitions=n_parts, on=("pair_id",))
        widths = _widths(k, d, targets, votes)
        ds = ds.map_batches(_fill, fn_kwargs={"widths": widths}, batch_format="pyarrow")
    ds.write_parquet(str(tmp.resolve()), partition_cols=["split"])
    # Ray Data names files at random and orders rows as tasks finish: rewritten into files named and ordered by
    # content (in a Ray task), so the training stream (student/stream.py) is the same run after run
    from pairs.parquet import canonical_parquet

    canon = ray.remote(num_cpus=1)(canonical_parquet)
    rows = {}
    for split in split_paths:
        folder = tmp / f"split={split}"
        folder.mkdir(parents=True, exist_ok=True)  # a split with no pairs is an empty folder
        rows[split] = ray.get(canon.remote(str(folder), str(tmp / split), ["pair_id"]))
        shutil.rmtree(folder)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return rows


def read_parquet(path: str | Path, light: bool = False, concurrency: int | None = None):
    """ray.data.read_parquet. `light`: for a pipeline whose own workers (training workers, scoring actors) hold
    every CPU of the machine: the files are listed here rather than by a listing task that would wait for a free
    CPU, and the read tasks, which only decode Parquet, take no CPU slot of their own (Ray Data's V1 Parquet read)."""
    import ray

    if not light:
        return ray.data.read_parquet(str(Path(path).resolve()))
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(str(Path(path).resolve()), num_cpus=0, concurrency=concurrency)
    finally:
        ctx.use_datasource_v2 = v2


def target_centroids(targets_path: str | Path, perspectives: list[str], target_filter: str, split: str = "train") -> dict:
    """Per perspective, the mean of the kept `split` targets (the attribution reference at inference, and the trivial
    fidelity predictor) and their count, in one streaming pass over the sparse target rows."""
    k, d = len(perspectives), target_dim(targets_path)
    pidx = {p: i for i, p in enumerate(perspectives)}
    sums, counts = np.zeros((k, d), np.float64), np.zeros(k, np.int64)
    for b in batches(targets_path, ["perspective", "split", "embedding", "parse_ok", "correct"]):
        b = _split_rows(b, split)
        if not b.num_rows:
            continue
        keep = keep_mask(b, target_filter)
        rows = np.array([pidx.get(p, -1) for p in b.column("perspective").to_pylist()])
        keep &= rows >= 0
        vecs = b.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
        np.add.at(sums, rows[keep], vecs[keep])
        counts += np.bincount(rows[keep], minlength=k)
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0)
    return {"centroids": means.astype(np.float32).tolist(), "counts": counts.tolist()}


def examples_summary(examples_dir: str | Path, codes: list[str], perspectives: list[str], probe_rows: int) -> dict:
    """One streaming pass over an examples folder: rows, pairs per label (class weights), the average-mode trivial
    predictor (mean over pairs with any target of their mean target), and PROBE: the first `probe_rows` pairs with
    a target (any pairs when none has one), the guidance diagnostics' fixed batch."""
    examples_dir = Path(examples_dir)
    k = len(perspectives)
    counts, rows, probe, avg_sum, avg_n = np.zeros(len(codes), np.int64), 0, [], None, 0
    names = pq.read_schema(next(examples_dir.glob("*.parquet"))).names
    for b in batches(examples_dir):
        rows += b.num_rows
        lab = b.column("label").to_numpy()
        counts += np.bincount(lab[lab >= 0], minlength=len(codes))
        if "targets" in names:
            from student.data import column_matrix

            mask = column_matrix(b, "target_mask")
            has = mask.sum(1) > 0
            t = column_matrix(b, "targets").reshape(b.num_rows, k, -1)
            mean = (t * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None]
            avg_sum = mean[has].sum(0) + (0 if avg_sum is None else avg_sum)
            avg_n += int(has.sum())
            if sum(p.num_rows for p in probe) < probe_rows and has.any():
                probe.append(b.filter(pa.array(has)))
        elif sum(p.num_rows for p in probe) < probe_rows:
            probe.append(b)
    if not probe:  # targets present but none kept: any pairs
        probe = [next(batches(examples_dir))]
    pq.write_table(pa.concat_tables(probe).slice(0, probe_rows), examples_dir.parent / f"{examples_dir.name}.{PROBE}")
    trivial_avg = (avg_sum / max(avg_n, 1)).astype(np.float32).tolist() if avg_sum is not None else None
    summary = {"rows": rows, "label_counts": counts.tolist(), "trivial_average": trivial_avg, "pairs_with_targets": avg_n}
    (examples_dir.parent / f"{examples_dir.name}.{SUMMARY}").write_text(json.dumps(summary))
    return summary
