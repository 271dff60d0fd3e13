"""`thinkbroad plan`: before anyone rents the GPUs, whether each stage of a run fits the cluster it is meant for, how
long it takes and what it costs, from the run config, the cluster's shape and the data.

Memory per GPU comes from the formulas the libraries use (vLLM's KV cache sizing, DeepSpeed's model-state
estimators mirrored in teacher/placement.py, vLLM's batch defaults in mpcot/placement.py, TRL's fused LM head);
placement comes from the same functions the stages call (mpcot/placement.py, teacher/placement.py); model sizes from
workflows/shapes.py. Nothing is loaded and Ray is not started: `thinkbroad run` runs this check after `prepare` and
refuses a stage that cannot fit on GPUs (on CPUs it only reports: the CPU path is the one this project runs).

By concern: inputs.py (splits, token lengths, model shapes, a finished run's measurements), engines.py (vLLM engine
memory), training.py (teacher, student and embedder training memory), timing.py (hours; generation rates, derived by
KV capacity where a GPU kind has none), build.py (the stages' checks and work; the accuracy sensitivity), render.py
(the text, and the verdicts of `thinkbroad run`).
"""
from workflows.plan.build import ACCURACIES, Plan, Sensitivity, StagePlan, Work, make_plan, totals
from workflows.plan.common import Check, PlanRefused
from workflows.plan.render import assumptions, check_run, price_line, render, render_sensitivity, render_table

__all__ = ["ACCURACIES", "Check", "Plan", "PlanRefused", "Sensitivity", "StagePlan", "Work", "assumptions", "check_run",
           "make_plan", "price_line", "render", "render_sensitivity", "render_table", "totals"]
