"""The plan itself: per stage what must fit (the checks) and the work with its hours, and how the total moves with the
teacher's accuracy, which sets the SFT rows, the DPO preference rows and the pass@k resampling."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mpcot.placement import engine_placement
from workflows.cluster import Cluster
from workflows.config import RunConfig
from workflows.plan.common import Check, count
from workflows.plan.engines import engine_check
from workflows.plan.inputs import Lengths, Pairs, finished_run, model_shapes, plan_pairs, token_lengths
from workflows.plan.timing import Timer
from workflows.plan.training import embedder_check, student_check, train_check
from workflows.shapes import ModelShape

# the teacher accuracies the plan's sensitivity table shows (with the one it assumes or measured)
ACCURACIES = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Work:
    what: str
    detail: str
    hours: float | None
    gpus: int  # GPUs the work uses (0 = CPU work)
    how: str = ""  # the rate it was timed with


@dataclass
class StagePlan:
    name: str
    checks: list[Check] = field(default_factory=list)
    work: list[Work] = field(default_factory=list)
    measured_s: float | None = None

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.checks)

    @property
    def hours(self) -> float | None:
        known = [w.hours for w in self.work if w.hours is not None]
        return sum(known) if known or not self.work else None

    def verdict(self) -> str:
        bad = [c for c in self.checks if not c.fits]
        if bad:
            return f"{self.name}: DOES NOT FIT: " + "; ".join(c.problem for c in bad)
        summary = "; ".join(c.summary for c in self.checks if c.summary) or "CPU only"
        return f"{self.name}: fits ({summary})"


@dataclass
class Sensitivity:
    """The run at one assumed teacher accuracy."""

    accuracy: float
    stage_hours: dict[str, float]
    hours: float
    gpu_hours: float


@dataclass
class Plan:
    cfg: RunConfig
    cluster: Cluster
    pairs: Pairs
    shapes: dict[str, ModelShape]
    lengths: Lengths
    stages: list[StagePlan]
    accuracy: tuple[float, str]
    notes: list[str]
    sensitivity: list[Sensitivity] = field(default_factory=list)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def totals(stages: list[StagePlan], cluster: Cluster) -> tuple[float, float, bool]:
    """Hours, GPU-hours (whole nodes held, cluster.held_gpus) and whether some work was not estimated."""
    hours = gpu_hours = 0.0
    unknown = False
    for st in stages:
        for w in st.work:
            if w.hours is None:
                unknown = True
                continue
            hours += w.hours
            gpu_hours += w.hours * cluster.held_gpus(w.gpus)
    return hours, gpu_hours, unknown


@dataclass
class _Inputs:
    """What the work is computed from, whatever the teacher's accuracy."""

    cfg: RunConfig
    cluster: Cluster
    pairs: Pairs
    lengths: Lengths
    shapes: dict[str, ModelShape]
    timer: Timer
    checks: dict[str, Check]
    embedder_actors: int
    gen_device: str
    gen_gpus: int
    gen_units: int


def make_plan(cfg: RunConfig, run_dir: Path, cluster: Cluster, total_pairs: int | None = None) -> Plan:
    """The whole plan: checks and work per stage. Raises ShapeError / PlanError with the fix when a model or the data
    cannot be read."""
    shapes, folders = model_shapes(cfg)
    pairs = plan_pairs(cfg, run_dir, total_pairs)
    stats, measured = finished_run(run_dir)
    lengths = token_lengths(cfg, pairs, folders["teacher"], folders["backbone"], stats)
    accuracy = (stats["overall"]["accuracy"], "measured (the finished run's stats.json)") if stats else \
        (cfg.plan.assume.teacher_accuracy, "plan.assume.teacher_accuracy")
    measured_tps = stats.get("throughput", {}).get("completion_tokens_per_s") if stats else None
    inp = _inputs(cfg, cluster, pairs, lengths, shapes)
    stages = _stages(inp, accuracy[0])
    notes = list(cluster.notes)
    most = max((w.gpus for st in stages for w in st.work), default=0)
    if most and cluster.gpus > most:
        notes.append(f"no stage uses more than {most} of the cluster's {cluster.gpus} GPUs: more engines "
                     "(generation.concurrency) or workers shorten the run at about the same GPU-hours")
    if inp.gen_device == "gpu":  # a generation rate derived rather than given: how
        for shape in {s.name: s for role, s in shapes.items() if role in ("teacher", "targets teacher")}.values():
            notes += [inp.timer.rate(shape).derivation] if inp.timer.rate(shape).derivation else []
    for stp in stages:
        stp.measured_s = measured.get(stp.name)
    if measured_tps:
        notes.append(f"the finished run in {run_dir} generated {measured_tps:,.0f} completion tokens/s (stats.json)")
    sensitivity = []
    for acc in sorted({*ACCURACIES, accuracy[0]}):
        at = stages if acc == accuracy[0] else _stages(inp, acc)
        hours, gpu_hours, _ = totals(at, cluster)
        sensitivity.append(Sensitivity(acc, {st.name: st.hours or 0.0 for st in at if st.work}, hours, gpu_hours))
    return Plan(cfg, cluster, pairs, shapes, lengths, stages, accuracy, notes, sensitivity)


def _inputs(cfg: RunConfig, cluster: Cluster, pairs: Pairs, lengths: Lengths, shapes: dict[str, ModelShape]) -> _Inputs:
    """The checks (none depends on the accuracy) and the generation placement."""
    teacher, g = shapes["teacher"], cfg.generation
    checks = {what: engine_check(cfg, teacher, cluster, lengths, what) for what in
              ("vLLM engines (base teacher)", "vLLM engines (SFT teacher, pass@k resampling)",
               "vLLM engines (base, SFT, DPO teachers)")}
    targets_teacher = shapes.get("targets teacher", teacher)
    checks["targets"] = engine_check(cfg, targets_teacher, cluster, lengths,
                                     f"vLLM engines ({'trained teacher' if targets_teacher is teacher else targets_teacher.name} "
                                     "writes the targets)")
    for kind in ("sft", "dpo"):
        checks[kind] = train_check(cfg, kind, teacher, cluster)
    checks["embedder"], embedder_actors = embedder_check(cfg, shapes["embedder"], cluster)
    checks["student"] = student_check(cfg, shapes["backbone"], shapes["embedder"].hidden, cluster)
    gen_device = checks["vLLM engines (base teacher)"].device
    gen_gpus = g.concurrency * g.gpus_per_engine if gen_device == "gpu" else 0
    gen_units = gen_gpus or g.concurrency * engine_placement(g.accelerator, cluster.cpus, 0, g.concurrency, g.cpus_per_engine,
                                                             g.gpus_per_engine, cluster.node_cpus).remote_args["num_cpus"]
    return _Inputs(cfg, cluster, pairs, lengths, shapes, Timer(cfg, cluster, lengths), checks, embedder_actors, gen_device,
                   gen_gpus, gen_units)


def _stages(inp: _Inputs, acc: float) -> list[StagePlan]:
    """Every stage's checks and work at teacher accuracy `acc`."""
    cfg, pairs, lengths, timer, checks = inp.cfg, inp.pairs, inp.lengths, inp.timer, inp.checks
    teacher, embedder, backbone = inp.shapes["teacher"], inp.shapes["embedder"], inp.shapes["backbone"]
    g, K = cfg.generation, len(cfg.perspectives)

    def gen_work(what: str, prompts: float, prompt_tokens: float, loads: int = 1, shape: ModelShape = teacher) -> Work:
        tin, tout = prompts * prompt_tokens, prompts * lengths.completion
        hours, how = timer.generation(tin + tout, inp.gen_device, inp.gen_units, shape, loads)
        return Work(what, f"{count(prompts)} prompts, {count(tin)} tokens in + {count(tout)} out", hours, inp.gen_gpus, how)

    stages = [StagePlan("prepare")]
    gen_pairs = sum(min(pairs.counts[s], g.max_pairs or pairs.counts[s]) for s in g.splits)
    rows = gen_pairs * K * g.samples_per_prompt
    stages.append(StagePlan("generate", [checks["vLLM engines (base teacher)"]],
                            [gen_work(f"MPCoT: {count(gen_pairs)} pairs x {K} perspectives x {g.samples_per_prompt}", rows,
                                      lengths.prompt_mean)]))
    # sft, dpo: FLOPs of 6 x params per token (+2 with recomputation; +2 for DPO's reference forward)
    for kind in ("sft", "dpo"):
        settings, check = getattr(cfg, kind), checks[kind]
        workers = settings.distributed.num_workers
        if kind == "sft":
            n_rows = rows * acc
            if settings.balance == "cap" and settings.cap_per_label:
                n_rows = min(n_rows, settings.cap_per_label * len(cfg.labels))
            per_row = min(settings.max_length, lengths.prompt_mean + lengths.completion)
            what = f"SFT: {count(n_rows)} rows (rationales with the gold label, accuracy {acc:.0%})"
        else:
            n_rows = rows * (1 - acc)  # each wrong rationale of a pair that has (or gets) a correct one
            per_row = 2 * min(settings.max_length, lengths.neutral_mean + lengths.completion)
            what = f"DPO: up to {count(n_rows)} preference rows (wrong rationales, 1 - accuracy)"
        per_step = settings.per_device_batch_size * settings.gradient_accumulation_steps * workers
        steps = settings.max_steps if settings.max_steps > 0 else math.ceil(n_rows * settings.epochs / per_step)
        tokens = steps * per_step * per_row
        factor = 6 + (2 if settings.gradient_checkpointing else 0) + (2 if kind == "dpo" else 0)
        hours, how = timer.flops(factor * teacher.matmul_params * tokens, check.device,
                                 workers if check.device == "gpu" else workers * settings.distributed.cpus_per_worker,
                                 cfg.plan.throughput.train_mfu)
        work = [Work(what, f"{steps:,} steps x {per_step} rows, {count(tokens)} tokens, {factor} x params FLOPs per token",
                     hours, workers if check.device == "gpu" else 0, how)]
        stage_checks = [check]
        if kind == "dpo" and settings.pass_k:
            no_correct = gen_pairs * (1 - acc) ** (K * g.samples_per_prompt)  # every perspective wrong (independence)
            stage_checks.insert(0, checks["vLLM engines (SFT teacher, pass@k resampling)"])
            work.insert(0, gen_work(f"pass@{settings.pass_k} resampling of {count(no_correct)} pairs no perspective got right",
                                    no_correct * settings.pass_k, lengths.neutral_mean))
        stages.append(StagePlan(kind, stage_checks, work))
    # teacher_eval: base, SFT and DPO teachers, every perspective and the neutral prompt
    if cfg.teacher_eval.enabled:
        split = cfg.teacher_eval.split
        n = min(pairs.counts[split], cfg.teacher_eval.max_pairs or pairs.counts[split])
        prompt = (lengths.prompt_mean * K + lengths.neutral_mean) / (K + 1)
        stages.append(StagePlan("teacher_eval", [checks["vLLM engines (base, SFT, DPO teachers)"]],
                                [gen_work(f"3 teachers x {count(n)} {split} pairs x {K + 1} prompts", 3 * n * (K + 1), prompt, loads=3)]))
    # distill: teacher targets (logit-KD reads the teacher's votes whatever the source), embeddings, students
    d = cfg.distill
    target_pairs = min(pairs.counts["train"], d.max_target_pairs or pairs.counts["train"]) + \
        min(pairs.counts["val"], d.fidelity_pairs or pairs.counts["val"])
    texts = target_pairs * K
    emb_check, emb_actors = checks["embedder"], inp.embedder_actors
    emb_tokens = texts * min(256, lengths.rationale_chars / 4 + 2)
    emb_gpus = emb_actors if emb_check.device == "gpu" else 0
    emb_hours, emb_how = timer.flops(2 * embedder.matmul_params * emb_tokens, emb_check.device, emb_actors,
                                     cfg.plan.throughput.student_mfu)
    variants = d.main_variants()
    s = d.train
    student = checks["student"]
    student_gpus = s.num_workers if student.device == "gpu" else 0
    per_epoch = (pairs.counts["train"] * 6 + pairs.counts["val"] * 2) * lengths.student_mean * backbone.matmul_params
    test = pairs.counts["test"] * 2 * lengths.student_mean * backbone.matmul_params
    st_hours, st_how = timer.flops(len(variants) * (s.epochs * per_epoch + test), student.device,
                                   student_gpus or s.num_workers * s.cpus_per_worker, cfg.plan.throughput.student_mfu)
    targets_teacher = inp.shapes.get("targets teacher", teacher)
    stages.append(StagePlan("distill", [checks["targets"], emb_check, student], [
        gen_work(f"targets: {count(target_pairs)} pairs x {K} perspectives", texts, lengths.prompt_mean, shape=targets_teacher),
        Work(f"embed {count(texts)} rationales ({d.embedder})", f"{count(emb_tokens)} tokens, 2 x params FLOPs per token",
             emb_hours, emb_gpus, emb_how),
        Work(f"{len(variants)} students ({len(d.seeds)} seeds) x up to {s.epochs} epochs",
             f"{count(pairs.counts['train'])} train pairs of {lengths.student_mean:.0f} tokens, 6 x params FLOPs per token",
             st_hours, student_gpus, st_how)]))
    stages.append(StagePlan("report"))
    return stages
