"""The informativeness probe of distillation targets: can a linear model tell the gold label from a perspective's
rationale embeddings? Run on every target source as it is written (targets.py); the report reads them all."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairs.parquet import batches
from student.examples import keep_mask


PROBE_ROWS = 20_000  # per perspective: a seeded uniform sample beyond this (the fit is what costs, not the rows)


def informativeness(table, perspectives: list[str], target_filter: str, folds: int = 5, max_rows: int = PROBE_ROWS) -> dict:
    """Per perspective, on the train rows the filter keeps: macro-F1 of a 5-fold cross-validated logistic
    regression from the rationale embedding to the gold label, against always answering the majority label.
    A probe no better than the majority says the targets cannot teach the label, whatever else they carry.

    table: the targets (a pa.Table or a Parquet file/folder, read in batches); beyond `max_rows` kept rows per
    perspective a seeded uniform sample of that many is probed (`probed` says how many)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(0)
    kept: dict[str, list] = {name: [] for name in perspectives}
    seen = dict.fromkeys(perspectives, 0)
    source = [table] if isinstance(table, pa.Table) else batches(table, ["perspective", "split", "gold_label", "embedding", "parse_ok", "correct"])
    for b in source:
        b = b.filter(pc.equal(b.column("split"), "train"))
        b = b.filter(pa.array(keep_mask(b, target_filter)))
        for name in perspectives:
            mine = b.filter(pc.equal(b.column("perspective"), name))
            if not mine.num_rows:
                continue
            # reservoir by random keys: keep the max_rows smallest keys seen so far
            keys = rng.random(mine.num_rows)
            kept[name].append(mine.select(["gold_label", "embedding"]).append_column("key", pa.array(keys)))
            seen[name] += mine.num_rows
            merged = pa.concat_tables(kept[name])
            if merged.num_rows > 2 * max_rows:
                kept[name] = [merged.take(pc.sort_indices(merged, [("key", "ascending")])[:max_rows])]
    out = {}
    for name in perspectives:
        merged = pa.concat_tables(kept[name]) if kept[name] else None
        if merged is not None and merged.num_rows > max_rows:
            merged = merged.take(pc.sort_indices(merged, [("key", "ascending")])[:max_rows])
        y = np.asarray(merged.column("gold_label").to_pylist()) if merged is not None else np.array([])
        classes, counts = np.unique(y, return_counts=True) if len(y) else (np.array([]), np.array([]))
        result = {"rows": seen[name], "label_counts": dict(zip(classes.tolist(), counts.tolist()))}
        if seen[name] > len(y):
            result["probed"] = int(len(y))
        usable = classes[counts >= 2]
        if len(usable) < 2:
            out[name] = result | {"note": "fewer than two labels with two rows each: nothing to probe"}
            continue
        keep = np.isin(y, usable)
        emb = merged.column("embedding").combine_chunks()
        x = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1).astype(np.float32)[keep]
        y = y[keep]
        k = int(min(folds, np.unique(y, return_counts=True)[1].min()))
        pred = cross_val_predict(LogisticRegression(max_iter=2000, class_weight="balanced"), x, y,
                                 cv=StratifiedKFold(k, shuffle=True, random_state=0))
        majority = np.full_like(y, classes[np.argmax(counts)])
        out[name] = result | {"folds": k, "macro_f1": float(f1_score(y, pred, average="macro")),
                              "majority_macro_f1": float(f1_score(y, majority, average="macro", zero_division=0))}
    return out


def probes(run_dir: Path) -> dict:
    """The informativeness probe of every target source written so far."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "student" / "targets").glob("*/probe.json"))}
