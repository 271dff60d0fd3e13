"""The plan as text (`thinkbroad plan`), and its one-line verdicts in `thinkbroad run`."""
from __future__ import annotations

import datetime
from pathlib import Path

from workflows.cluster import Cluster, default_cluster
from workflows.config import RunConfig
from workflows.plan.build import Plan, make_plan, totals
from workflows.plan.common import PlanRefused, hours


def render(plan: Plan, config_path: str) -> str:
    """The plan as text: cluster, data, models, per-stage memory and verdict, the time and cost table, how it moves with
    the teacher's accuracy, assumptions."""
    cfg = plan.cfg
    lines = [f"thinkbroad plan: {config_path} ({cfg.name})", f"cluster: {plan.cluster.describe()}"]
    lines += [f"  note: {n}" for n in plan.notes]
    c = plan.pairs.counts
    lines.append(f"data: {sum(c.values()):,} pairs (train {c['train']:,}, val {c['val']:,}, test {c['test']:,}) from {plan.pairs.source}")
    lines.append("models:")
    for role, s in plan.shapes.items():
        lines.append(f"  {role:<9}{s.name}: {s.model_type}, {s.params / 1e9:.3f}B parameters (largest layer {s.largest_layer / 1e6:.0f}M), "
                     f"{s.layers} layers x {s.hidden}, {s.kv_heads} KV heads x {s.head_dim}, {s.dtype}; from {s.source}")
    L = plan.lengths
    lines.append(f"tokens: MPCoT prompt {L.prompt_mean:.0f} on average (longest {L.prompt_max}), neutral prompt {L.neutral_mean:.0f} "
                 f"[{L.prompt_how}]; answer {L.completion:.0f} [{L.completion_how}]; student input {L.student_mean:.0f} [{L.student_how}]")
    lines += ["", "memory and placement per stage"]
    shown: dict[tuple, str] = {}  # the same engines in several stages: their arithmetic once
    for st in plan.stages:
        if not st.checks:
            lines.append(f"{st.name:<13} CPU only: nothing to check")
            continue
        lines.append(f"{st.name:<13} {'fits' if st.fits else 'DOES NOT FIT'}")
        for ck in st.checks:
            key = (ck.placement, tuple(ck.lines), ck.problem)
            if key in shown:
                lines.append(f"  {ck.what} [{ck.device.upper()}]: the same engines and memory as in {shown[key]}")
                continue
            shown[key] = st.name
            lines.append(f"  {ck.what} [{ck.device.upper()}]: {ck.placement}")
            lines += [f"    {x}" for x in ck.lines]
            if not ck.fits:
                lines.append(f"    DOES NOT FIT: {ck.problem}")
    lines += ["", render_table(plan), "", render_sensitivity(plan), "", "assumptions:"]
    lines += [f"  - {a}" for a in assumptions(plan)]
    return "\n".join(lines)


def render_table(plan: Plan) -> str:
    """Markdown table: per stage the work, GPUs held, hours, GPU-hours and cost, with a total."""
    price = plan.cfg.plan.gpu_hour_usd
    measured = any(st.measured_s for st in plan.stages)
    cost_head = f" cost ({plan.cfg.plan.gpu_hour_usd_as_of} price) |" if plan.cfg.plan.gpu_hour_usd_as_of else " cost |"
    head = "| stage | work | rate | GPUs held | hours | GPU-hours |" + (cost_head if price else "") + (" measured |" if measured else "")
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for st in plan.stages:
        for w in st.work:
            held = plan.cluster.held_gpus(w.gpus)
            gh = None if w.hours is None else w.hours * held
            cells = [st.name, f"{w.what}: {w.detail}", w.how, str(held), hours(w.hours), hours(gh)]
            if price:
                cells.append("—" if gh is None else f"${gh * price:,.0f}")
            if measured:
                cells.append(f"{st.measured_s / 3600:.2f} h" if st.measured_s else "")
            rows.append("| " + " | ".join(cells) + " |")
    tot_h, tot_gh, unknown = totals(plan.stages, plan.cluster)
    total = ["**total**", "", "", "", f"**{hours(tot_h)}**", f"**{hours(tot_gh)}**"]
    if price:
        total.append(f"**${tot_gh * price:,.0f}**")
    if measured:
        total.append("")
    rows.append("| " + " | ".join(total) + " |")
    if unknown:
        rows.append("\n(— not estimated; the total leaves it out)")
    return "\n".join(rows)


def render_sensitivity(plan: Plan) -> str:
    """The total at each assumed teacher accuracy: accuracy sets the SFT rows (x accuracy), the DPO preference rows
    (x (1 - accuracy)) and the pairs resampled (x (1 - accuracy)^(perspectives x samples))."""
    price = plan.cfg.plan.gpu_hour_usd
    stages = [name for name in ("sft", "dpo") if any(name in s.stage_hours for s in plan.sensitivity)]
    head = "| teacher accuracy | " + " | ".join(f"{name} hours" for name in stages) + " | total hours | GPU-hours |" + \
        (" cost |" if price else "")
    rows = [f"hours by the teacher's accuracy ({plan.accuracy[1]}: {plan.accuracy[0]:.0%}, marked *):", head,
            "|---" * (head.count("|") - 1) + "|"]
    for s in plan.sensitivity:
        cells = [f"{s.accuracy:.0%}{' *' if s.accuracy == plan.accuracy[0] else ''}"]
        cells += [hours(s.stage_hours.get(name)) for name in stages] + [hours(s.hours), hours(s.gpu_hours)]
        if price:
            cells.append(f"${s.gpu_hours * price:,.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def price_line(cfg: RunConfig, today: datetime.date | None = None) -> str:
    """The price with what it is and the month it was in effect, and how old that month is."""
    p = cfg.plan
    line = f"price ${p.gpu_hour_usd:g} per GPU-hour" + (f": {p.gpu_hour_usd_source}" if p.gpu_hour_usd_source else "")
    if p.gpu_hour_usd_as_of:
        year, month = map(int, p.gpu_hour_usd_as_of.split("-"))
        today = today or datetime.date.today()
        months = (today.year - year) * 12 + today.month - month
        line += f"; as of {p.gpu_hour_usd_as_of}" + (f" ({months} months before this plan: check today's)" if months >= 6 else "")
    else:
        line += "; undated (set plan.gpu_hour_usd_as_of: YYYY-MM)"
    return line + " [plan.gpu_hour_usd]"


def assumptions(plan: Plan) -> list[str]:
    cfg, a, t = plan.cfg, plan.cfg.plan.assume, plan.cfg.plan.throughput
    out = [f"teacher accuracy {plan.accuracy[0]:.0%} ({plan.accuracy[1]}): SFT rows = rationales x accuracy; DPO rows = "
           "rationales x (1 - accuracy), an upper bound; pairs resampled = pairs x (1 - accuracy)^(perspectives x samples); "
           "the table above gives the hours at other accuracies",
           "each model load (engine start, trainer start and export) " + ", ".join(f"{m:g} min on {d.upper()}" for d, m in
           ({"gpu": 5.0, "cpu": 0.5} | a.startup_minutes).items()) + f"; per GPU {a.gpu_runtime_gib:g} GiB "
           "beyond the estimates (CUDA context, NCCL, allocator) [plan.assume]",
           "generation time = (prompt + answer tokens) / (tokens/s per GPU x GPUs); the figure is a serving benchmark's "
           "total throughput, prefix caching of the shared few-shot prompt is not credited; a GPU kind without one gets "
           "its chip-mate's scaled by a decode roofline of KV capacity and bandwidth (notes) "
           "[plan.throughput.generation_tokens_per_s]",
           f"training time = FLOPs / (GPUs x bf16 peak x utilisation): teacher {t.train_mfu:.0%}, student {t.student_mfu:.0%}; "
           "attention FLOPs and early stopping are not counted; students run every epoch [plan.throughput]",
           f"CPU work at {t.cpu_gflops_per_core:g} GFLOPS per core [plan.throughput.cpu_gflops_per_core]",
           "training memory at the longest row (max_length) in every micro-batch, the parts summed (an upper bound of the "
           "peak); activations counted from what a layer keeps for backward (workflows/shapes.py); TRL 1.16's trainers "
           "compute log-probabilities with a fused LM head (add_fused_lm_head) that never builds the (batch, seq, vocab) "
           "logits: its tile and fp32 gradients are counted instead, and Liger is off (TRL 1.16 deprecates it and refuses "
           "its fused cross-entropy)",
           "GPUs held: whole nodes, at least the nodes the cluster keeps (min_workers); the head node and storage are not priced"]
    if cfg.plan.gpu_hour_usd:
        out.append(price_line(cfg))
    return out


def check_run(cfg: RunConfig, run_dir: Path, stages: list[str], cluster: Cluster | None = None) -> list[str]:
    """Before a run: the plan's one-line verdict per stage; PlanRefused naming each stage that cannot fit."""
    cluster = cluster or default_cluster()
    plan = make_plan(cfg, run_dir, cluster)
    chosen = [s for s in plan.stages if s.name in stages]
    lines = [f"plan on {cluster.describe()}:"] + [f"  {s.verdict()}" for s in chosen]
    bad = [s for s in chosen if not s.fits]
    if bad:
        raise PlanRefused("\n".join(lines) + "\nthe plan refuses " + ", ".join(s.name for s in bad) + " (above: the number and "
                          "the fix); `thinkbroad plan --config ...` shows the whole plan, `thinkbroad run --no-plan` skips this check")
    return lines
