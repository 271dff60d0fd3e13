"""The whole pipeline as one job: prepare -> generate -> sft -> dpo -> teacher_eval -> distill -> report.

Every stage skips itself when its manifest matches, so a rerun after a kill resumes where it stopped.
`--from STAGE` forces that stage and the ones after it to rerun; `--only STAGE` runs one stage (and whatever it
depends on that is not up to date). Each stage is a module of workflows/stages/; the last, `report`, writes
RUN_DIR/report.md (workflows/stages/report.py).
"""
from __future__ import annotations

from pathlib import Path

from workflows import tracking
from workflows.artifacts import MANIFEST
from workflows.config import RunConfig
from workflows.stages.common import log
from workflows.stages.generate import generate
from workflows.stages.prepare import prepare

STAGES = ("prepare", "generate", "sft", "dpo", "teacher_eval", "distill", "report")
current_stage: str | None = None  # the stage `run` is in (named when Ctrl-C or SIGTERM stops it: workflows/cli.py)
# the folders whose manifests mark each stage done
STAGE_DIRS = {
    "prepare": ["data"], "generate": ["mpcot"], "sft": ["teacher/sft"], "dpo": ["teacher/dpo"],
    "teacher_eval": ["teacher/eval"], "distill": ["student/targets/*", "student/variants/*"], "report": [],
}


def _stage_fn(name: str):
    from workflows.stages import report, students, teacher

    return {
        "prepare": prepare, "generate": generate, "sft": teacher.sft, "dpo": teacher.dpo,
        "teacher_eval": teacher.teacher_eval, "distill": students.distill, "report": report.write_report,
    }[name]


def force_from(run_dir: Path, stage: str) -> None:
    """Drop the manifests of `stage` and every later stage, so they rerun (their partial work is kept)."""
    for name in STAGES[STAGES.index(stage):]:
        for pattern in STAGE_DIRS[name]:
            for d in run_dir.glob(pattern):
                (d / MANIFEST).unlink(missing_ok=True)


def run(cfg: RunConfig, run_dir: Path, from_stage: str | None = None, only: str | None = None, check: bool = True,
        cluster=None) -> Path:
    """`check`: first the plan's verdict per stage (workflows/plan/) on `cluster` (None: this machine, or the Ray
    cluster of a `ray job submit` job); a stage that cannot fit its GPUs is refused before anything starts."""
    if from_stage:
        force_from(run_dir, from_stage)
    stages = [only] if only else list(STAGES)
    if not cfg.teacher_eval.enabled and "teacher_eval" in stages and not only:
        stages.remove("teacher_eval")
    if check:
        from workflows.plan import check_run

        prepare(cfg, run_dir)  # the plan reads the prepared splits
        for line in check_run(cfg, run_dir, list(STAGES[: STAGES.index(only) + 1]) if only else stages, cluster):
            log(line)
    global current_stage
    for i, name in enumerate(stages, 1):
        log(f"=== stage {i}/{len(stages)}: {name} ===")
        current_stage = name
        _stage_fn(name)(cfg, run_dir)
        tracking.sync(cfg, run_dir, log)  # MLflow: what this stage wrote (workflows/tracking.py)
    current_stage = None
    return run_dir / "report.md"

