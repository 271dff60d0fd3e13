"""`thinkbroad score` (any pair file, labelled or not, scored by a trained student into resumable Parquet parts) and
`thinkbroad eval` (a student folder on the run's test split); both score on Ray Data workers (student/score.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hardware.runtime import ensure_ray
from workflows.artifacts import fingerprint, start_attempt, write_json_atomic
from workflows.config import RunConfig
from workflows.stages.common import log, remote
from workflows.stages.prepare import prepare


def score_file(pairs: str, student_target: str, output: str, cfg: RunConfig | None = None, progress: bool = True) -> dict:
    """`thinkbroad score`: every pair of `pairs` (any file the reader accepts, labelled or not; the config's column
    mapping, joins and filter when `cfg` is given) scored by a student folder (or a run dir's best LRKD student)
    into the Parquet folder `output` (part-*.parquet, resumable). With labels, the metrics (accuracy, macro-F1,
    nDCG@10) are returned and written to `output/_metrics.json`."""
    from mpcot.labels import DEFAULT_ESCI_LABELS, Label
    from serve.launch import find_student
    from student.score import ScoreConfig, gains_of, metrics_from_parts, score_dataset, write_manifest as write_score_manifest
    from workflows.config import DataConfig
    from pairs.errors import DataError
    from pairs.scan import scan_pairs
    from pairs.write import input_files

    student = find_student(student_target)
    scfg = json.loads((student / "student_config.json").read_text())
    codes, persp = scfg["labels"], scfg["perspectives"]
    labels = list(cfg.labels) if cfg else [Label(**lab) for lab in DEFAULT_ESCI_LABELS]
    if [lab.name for lab in labels] != codes:
        if cfg:
            raise DataError(f"the config's labels {[lab.name for lab in labels]} are not the student's {codes} "
                            f"({student}); score with the config the student was trained with")
        labels = codes  # not ESCI's: nDCG gains are the linear grades
    data = cfg.data.model_copy(update={"path": str(pairs)}) if cfg else DataConfig(path=str(pairs))
    out = Path(output)
    inputs = {str(f): fingerprint(f) for f in input_files(data)}
    key = hashlib.sha256(json.dumps([fingerprint(student / "model.safetensors"), data.model_dump(mode="json"), inputs],
                                    sort_keys=True).encode()).hexdigest()[:16]  # parts of another input are discarded
    done = out / "_manifest.json"
    if done.exists() and (m := json.loads(done.read_text())).get("key") == key and m.get("inputs") == inputs:
        log(f"score: up to date ({out})")
        return m["metrics"]
    t0 = time.time()
    start_attempt(out, key, "score")  # parts of another student or input are discarded
    done.unlink(missing_ok=True)
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if cfg is None and _canonical(Path(pairs)):  # a split `prepare` wrote: read as it is
        canonical, total = Path(pairs), pq.ParquetFile(pairs).metadata.num_rows
    else:
        scan = scan_pairs(data, codes, work, require_labels=False)
        canonical, total = work / "pairs.parquet", scan.index.num_rows
        writer = None
        for b in scan.batches():
            b = b.select(CANONICAL)
            writer = writer or pq.ParquetWriter(canonical, b.schema)
            writer.write_table(b, row_group_size=8192)
        writer.close()
    log(f"score: {total} pairs from {pairs} with {student}")
    ensure_ray()
    settings = cfg.distill.score if cfg else ScoreConfig()
    res = score_dataset(canonical, student, out, settings, total=total, progress=progress, what="score")
    metrics = remote(metrics_from_parts)(out, codes, persp, gains_of(labels), mode=scfg["mode"])  # off the driver
    metrics.pop("predictions", None)
    write_json_atomic(metrics, out / "_metrics.json")
    write_score_manifest(out, {"key": key, "inputs": inputs, "student": str(student), "rows": res.rows,
                               "scored_now": res.scored_now, "reused": res.reused, "seconds": round(time.time() - t0, 2),
                               "metrics": metrics})
    shutil.rmtree(work, ignore_errors=True)
    log(f"score: {res.rows} pairs ({res.scored_now} scored now, {res.reused} resumed) -> {out}"
        + (f"; accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, nDCG@10 "
           f"{metrics['ranking']['ndcg@10'] if metrics['ranking']['ndcg@10'] is None else round(metrics['ranking']['ndcg@10'], 3)}"
           if "accuracy" in metrics else " (unlabelled: no metrics)"))
    return metrics


CANONICAL = ["pair_id", "query_id", "query", "title", "attributes", "label"]


def _canonical(path: Path) -> bool:
    """A Parquet file with the columns `prepare` writes (RUN_DIR/data/<split>.parquet)."""
    if path.suffix.lower() not in (".parquet", ".pq") or not path.is_file():
        return False
    try:
        return set(CANONICAL) <= set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid):  # not readable as Parquet: the reader reports it
        return False


def evaluate_folder(cfg: RunConfig, run_dir: Path, student_dir: str) -> dict:
    """Metrics of any student folder on the run's test split (scored on Ray Data workers; predictions under
    <student_dir>/predictions/test)."""
    paths = prepare(cfg, run_dir)
    out = Path(student_dir) / "predictions" / "test"
    shutil.rmtree(out, ignore_errors=True)  # the folder's weights may have changed since
    return score_split(cfg, Path(student_dir), paths["test"], out, what="test", order=paths["test"])


def score_split(cfg: RunConfig, student: Path, source, out_dir: Path, trivial: list | None = None,
                keep: list[str] | None = None, what: str = "score", order: str | Path | None = None) -> dict:
    """Score a Parquet split or examples folder with `student` on Ray Data workers into out_dir/part-*.parquet
    (resuming finished parts) and return its metrics (with fidelity when the rows carry targets and `trivial`;
    `keep`: the perspectives whose targets count; `order`: a split file whose pair ids the metrics must cover, in
    its order). The metrics are computed in a Ray task: the driver never holds the scored rows."""
    from student.score import gains_of, metrics_from_parts, score_dataset

    ensure_ray()
    score_dataset(source, student, out_dir, cfg.distill.score, trivial=trivial, progress=False, what=what, keep=keep)
    persp = [p.name for p in cfg.perspectives]
    mode = json.loads((student / "student_config.json").read_text())["mode"]
    return remote(metrics_from_parts)(out_dir, [lab.name for lab in cfg.labels], persp, gains_of(cfg.labels), mode=mode,
                                      order=None if order is None else str(order))
