"""Memory of the training jobs: the teacher's SFT and DPO (DeepSpeed's model-state estimators mirrored in
teacher/placement.py, the DPO reference model, activations, TRL's fused LM head), the student and the rationale
embedder."""
from __future__ import annotations

import math

from hardware.cpu import cpu_info
from teacher import placement as teacher_placement
from workflows.cluster import Cluster
from workflows.config import RunConfig
from workflows.plan.common import Check, GiB, gib
from workflows.shapes import DTYPE_BYTES, ModelShape

# TRL 1.16's fused LM head. SFTTrainer and DPOTrainer (and DPO's reference model) patch the model with
# `trl.trainer.utils.add_fused_lm_head`, whose `trl.kernels.chunked_logprob.ChunkedLogProbFunction` projects only the
# positions that have a label, in tiles of FUSED_TOKENS tokens x FUSED_VOCAB vocabulary entries in the compute dtype
# (bf16 here), and folds each tile into fp32 per-token statistics (online log-sum-exp): the (batch, seq, vocab) logits
# are never built, neither in bf16 nor upcast to fp32. Liger is not the way round it in TRL 1.16: `use_liger_kernel`
# is deprecated there and its fused linear cross-entropy is refused (it would replace this head), so turning it on
# would change only the layer kernels. What the head does allocate is counted (fused_head_bytes); the constants are
# TRL's, and tests/test_plan.py fails when the installed TRL's differ or its trainers stop installing the head.
FUSED_TOKENS = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
FUSED_VOCAB = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


def fused_head_bytes(shape: ModelShape, tokens: int, w: int, head_trainable: bool) -> dict[str, int]:
    """Per GPU, what TRL's fused LM head holds at its peak (the start of the backward pass, over every activation kept
    for backward) for `tokens` labelled positions in a micro-batch, `w` the compute dtype's bytes: its tile
    [FUSED_TOKENS, FUSED_VOCAB] (one buffer, reused), the labelled hidden states it saves for backward, the fp32
    gradient of those hidden states, and, when the head is trained (full fine-tuning; PEFT's all-linear leaves it
    frozen), the fp32 gradient of the head's weight [vocab, hidden] it accumulates before handing DeepSpeed the 16-bit
    gradient (which the model-state estimate holds: ZeRO-3 gathers 4 bytes x the largest layer, the head here)."""
    parts = {"tile": min(tokens, FUSED_TOKENS) * min(shape.vocab, FUSED_VOCAB) * w,
             "hidden": tokens * shape.hidden * w, "hidden grad": tokens * shape.hidden * 4}
    parts["head weight grad"] = shape.vocab * shape.hidden * 4 if head_trainable else 0
    return parts


def train_memory(settings, shape: ModelShape, kind: str, workers: int, gpus_per_node: int, w: int) -> tuple[dict, int]:
    """Per-GPU bytes of a teacher training job, by part, and host bytes per node."""
    dist = settings.distributed
    nodes = math.ceil(workers / gpus_per_node)
    gpn = min(workers, gpus_per_node)
    lora = settings.lora
    trainable = shape.lora_params(lora.r, lora.target_modules) if lora.enabled else None
    states, host = teacher_placement.model_states_bytes(dist.zero_stage, dist.offload, shape.params, shape.largest_layer,
                                                        gpn, nodes, trainable, w)
    parts = {"model states": states}
    if kind == "dpo" and not lora.enabled:  # TRL copies the policy as the reference: sharded under ZeRO-3, whole otherwise
        parts["reference model"] = (w * shape.params // workers + w * shape.largest_layer) if dist.zero_stage == 3 else w * shape.params
    b = settings.per_device_batch_size * (2 if kind == "dpo" else 1)  # DPO: chosen and rejected in one batch
    s = settings.max_length
    layer = b * s * shape.activation_bytes_per_token_layer(w, s)
    parts["activations"] = (shape.layers * b * s * shape.hidden * w + layer) if settings.gradient_checkpointing \
        else shape.layers * layer
    # every position labelled (the longest row); the head is trained unless LoRA freezes it
    parts["fused LM head"] = sum(fused_head_bytes(shape, b * s, w, not lora.enabled).values())
    parts["DeepSpeed buffers"] = teacher_placement.comm_buffer_bytes(dist.zero_stage)
    return parts, host


def train_check(cfg: RunConfig, kind: str, shape: ModelShape, cluster: Cluster) -> Check:
    settings = getattr(cfg, kind)
    dist = settings.distributed
    device = teacher_placement.resolve_device(dist.accelerator, cluster.gpus)
    lora = "LoRA r=%d" % settings.lora.r if settings.lora.enabled else "full fine-tuning"
    zero = f"ZeRO-{dist.zero_stage}" if dist.zero_stage else "DDP (no ZeRO)"
    offload = " + offload" if dist.offload else ""
    head = (f"{dist.num_workers} Ray Train workers x {'1 GPU + ' if device == 'gpu' else ''}{dist.cpus_per_worker} CPU, "
            f"{zero}{offload}, {lora}, batch {settings.per_device_batch_size} x {settings.max_length} tokens"
            + (", gradient checkpointing" if settings.gradient_checkpointing else ""))
    c = Check(f"{kind} training", device, head)
    runtime = cfg.plan.assume.gpu_runtime_gib * GiB
    if device == "cpu":
        w = 2 if dist.bf16 == "on" or (dist.bf16 == "auto" and cpu_info().native_bf16) else 4
        parts, _ = train_memory(settings, shape, kind, dist.num_workers, dist.num_workers, w)
        per_worker = sum(parts.values())
        total = per_worker * dist.num_workers
        ram = cluster.cpu_memory_gib
        c.need_gib, c.have_gib = total / GiB, ram
        c.lines.append("per worker: " + " + ".join(f"{k} {gib(v)}" for k, v in parts.items()) + f" = {gib(per_worker)} GiB "
                       f"({'bf16' if w == 2 else 'fp32'}); x {dist.num_workers} workers on one machine = {gib(total)} GiB"
                       + (f" of {ram:.0f} GiB RAM" if ram else ""))
        if dist.num_workers * dist.cpus_per_worker > cluster.cpus:
            c.lines.append(f"warning: {dist.num_workers} workers x {dist.cpus_per_worker} CPU > {cluster.cpus:g} CPUs: Ray "
                           "waits for CPUs that never come")
        if ram and total / GiB > ram:
            c.lines.append(f"warning: more than the RAM ({ram:.0f} GiB)")
        c.summary = f"{dist.num_workers} CPU workers, {zero}, {gib(total)} GiB RAM"
        return c
    if dist.num_workers > cluster.gpus:
        c.fits, c.problem = False, _too_few_gpus(f"{kind}.distributed", dist.num_workers, cluster)
        return c
    group = cluster.gpu_group
    if group.gpu_memory_gib is None:
        c.lines.append("GPU memory unknown: not checked")
        c.summary = f"{dist.num_workers} GPU workers; memory not checked"
        return c
    w = 4 if dist.bf16 == "off" else 2
    parts, host = train_memory(settings, shape, kind, dist.num_workers, group.gpus, w)
    parts["runtime"] = runtime
    need = sum(parts.values())
    mem = group.gpu_memory_gib * GiB
    c.need_gib, c.have_gib = need / GiB, mem / GiB
    estimator = {2: "estimate_zero2_model_states_mem_needs", 3: "estimate_zero3_model_states_mem_needs"}.get(dist.zero_stage)
    c.lines.append("per GPU: " + " + ".join(f"{k} {gib(v)}" for k, v in parts.items()) + f" = {gib(need)} of {gib(mem)} GiB"
                   + (f" (model states: DeepSpeed's {estimator} on {shape.params / 1e9:.2f}B parameters"
                      + (f", {shape.lora_params(settings.lora.r, settings.lora.target_modules) / 1e6:.1f}M trainable"
                         if settings.lora.enabled else "") + ")" if estimator else ""))
    c.lines.append(_fused_head_line(settings, shape, kind, w))
    ram = group.memory_gib
    if ram:
        c.lines.append(f"host memory per node: {gib(host)} of {ram:.0f} GiB (the estimator's CPU column)")
    if need > mem:
        c.fits = False
        c.problem = (f"{zero}{offload} {lora} of {shape.params / 1e9:.1f}B parameters needs {gib(need)} GiB per GPU on "
                     f"{dist.num_workers} GPUs, the GPUs have {gib(mem)}; " + _train_fixes(cfg, kind, shape, cluster))
    elif ram and host > ram * GiB:
        c.fits, c.problem = False, (f"{zero}{offload} needs {gib(host)} GiB of host memory per node, the nodes have "
                                    f"{ram:.0f}: turn {kind}.distributed.offload off or use more nodes")
    c.summary = f"{dist.num_workers} GPU workers, {zero}{offload}, {gib(need)} of {gib(mem)} GiB per GPU"
    return c


def _fused_head_line(settings, shape: ModelShape, kind: str, w: int) -> str:
    """The fused LM head's part, piece by piece, beside the logits it does not build."""
    b = settings.per_device_batch_size * (2 if kind == "dpo" else 1)
    tokens = b * settings.max_length
    f = fused_head_bytes(shape, tokens, w, not settings.lora.enabled)
    logits = tokens * shape.vocab

    def g2(x: float) -> str:
        return f"{x / GiB:.2f}"

    return (f"fused LM head (TRL 1.16 add_fused_lm_head; {b} x {settings.max_length} labelled positions at most): tile "
            f"{g2(f['tile'])} ({min(tokens, FUSED_TOKENS)} x {min(shape.vocab, FUSED_VOCAB)} x {w} B) + hidden states "
            f"{g2(f['hidden'])} + their fp32 gradient {g2(f['hidden grad'])}"
            + (f" + the head's fp32 weight gradient {g2(f['head weight grad'])} ({shape.vocab:,} x {shape.hidden} x 4 B)"
               if f["head weight grad"] else " (LoRA: the head is frozen)")
            + f" = {g2(sum(f.values()))} GiB; the {b} x {settings.max_length} x {shape.vocab:,} logits it never builds would "
            f"be {gib(logits * w)} GiB" + (f" in bf16, {gib(logits * 4)} upcast to fp32" if w == 2 else " in fp32"))


def _too_few_gpus(section: str, workers: int, cluster: Cluster) -> str:
    """A Ray Train job of one GPU per worker that asks for more GPUs than the cluster has."""
    if not cluster.gpus:
        return f"{section}.accelerator is gpu and {cluster.source} has no GPU"
    return f"{section}.num_workers {workers} > the cluster's {cluster.gpus} GPUs: set {section}.num_workers: {cluster.gpus}"


def _train_fixes(cfg: RunConfig, kind: str, shape: ModelShape, cluster: Cluster) -> str:
    """The settings that would fit, each with its number."""
    settings = getattr(cfg, kind)
    dist = settings.distributed
    group = cluster.gpu_group
    mem = group.gpu_memory_gib * GiB
    w = 4 if dist.bf16 == "off" else 2
    options = []
    trials = [(f"set {kind}.distributed.zero_stage: 3", {"zero_stage": 3}, None),
              (f"enable {kind}.lora", None, {"enabled": True}),
              (f"set {kind}.distributed.offload: true", {"offload": True}, None),
              (f"set {kind}.per_device_batch_size: 1 and gradient_checkpointing: true", None, None)]
    for text, dist_change, lora_change in trials:
        trial = settings.model_copy(update={
            "distributed": dist.model_copy(update=dist_change or {}),
            "lora": settings.lora.model_copy(update=lora_change or {}),
            **({"per_device_batch_size": 1, "gradient_checkpointing": True} if text.startswith("set " + kind + ".per") else {}),
        })
        if trial == settings:
            continue
        parts, _ = train_memory(trial, shape, kind, dist.num_workers, group.gpus, w)
        need = sum(parts.values()) + cfg.plan.assume.gpu_runtime_gib * GiB
        if need <= mem:
            options.append(f"{text} ({gib(need)} GiB)")
    return " or ".join(options) if options else "no single setting fits: use GPUs with more memory or a smaller teacher"


def student_check(cfg: RunConfig, backbone: ModelShape, target_dim: int, cluster: Cluster) -> Check:
    from student.model import StudentConfig, head_parameters

    d, s = cfg.distill, cfg.distill.train
    device = "gpu" if (s.accelerator == "gpu" or (s.accelerator == "auto" and cluster.gpus)) else "cpu"
    persp, labels = [p.name for p in cfg.perspectives], [lab.name for lab in cfg.labels]
    head = max(head_parameters(StudentConfig(labels, persp, v.extractor if v.kind == "lrkd" else "none", v.mode,
                                             s.latent_dim, s.poly_codes, target_dim, s.max_length), backbone.hidden)
               for v in cfg.distill.main_variants())
    params = backbone.params + head
    # fp32 weights, gradients, two Adam moments, and DDP's gradient buckets
    states = 20 * params
    L = s.max_length
    act = backbone.layers * s.batch_size * L * backbone.activation_bytes_per_token_layer(4, L)
    if "gat" in d.extractors:  # GATv2 scores every token pair: (B, L, L, 64) edge features, a few of them live
        act += 3 * s.batch_size * L * L * 64 * 4
    c = Check("student training", device, f"{s.num_workers} Ray Train workers x {'1 GPU' if device == 'gpu' else f'{s.cpus_per_worker} CPU'}, "
              f"DDP fp32, {backbone.params / 1e6:.0f}M encoder + {head / 1e6:.2f}M head (the largest variant), "
              f"batch {s.batch_size} x {L} tokens")
    runtime = cfg.plan.assume.gpu_runtime_gib * GiB if device == "gpu" else 0
    need = states + act + runtime
    c.lines.append(f"per worker: weights, gradients, Adam and DDP buckets {gib(states)} (20 B x {params / 1e6:.1f}M) + "
                   f"activations {gib(act)}" + (f" + runtime {gib(runtime)}" if runtime else "") + f" = {gib(need)} GiB")
    if device == "gpu":
        if s.num_workers > cluster.gpus:
            c.fits, c.problem = False, _too_few_gpus("distill.train", s.num_workers, cluster)
            return c
        mem = cluster.gpu_group.gpu_memory_gib
        c.need_gib, c.have_gib = need / GiB, mem
        if mem is not None and need > mem * GiB:
            c.fits, c.problem = False, (f"the student needs {gib(need)} GiB per GPU, the GPUs have {mem:g}: lower "
                                        f"distill.train.batch_size (now {s.batch_size}) or max_length (now {L})")
        c.summary = f"{s.num_workers} GPU workers, {gib(need)} GiB per GPU"
    else:
        ram = cluster.cpu_memory_gib
        c.need_gib, c.have_gib = s.num_workers * need / GiB, ram
        if ram and s.num_workers * need > ram * GiB:
            c.lines.append(f"warning: {s.num_workers} workers need more than the RAM ({ram:.0f} GiB)")
        c.summary = f"{s.num_workers} CPU workers, {gib(s.num_workers * need)} GiB RAM"
    return c


def embedder_check(cfg: RunConfig, embedder: ModelShape, cluster: Cluster) -> tuple[Check, int]:
    """The rationale embedder's actor pool (student/embed.py `embedder_placement`, on the GPUs live when the stage
    starts: the nodes the cluster keeps) and its memory; returns the check and the number of actors."""
    from student.embed import embedder_placement

    d = cfg.distill
    actors, resources = embedder_placement(cluster.held_gpus(0))
    device = "gpu" if "num_gpus" in resources else "cpu"
    weights = embedder.params * DTYPE_BYTES.get(embedder.dtype, 4)
    act = d.embed_batch_size * 256 * embedder.hidden * 4 * 8  # a forward pass without grad: a few (B, 256, h) fp32 tensors
    c = Check("rationale embedder", device, f"{actors} Ray Data actor(s) x 1 {device.upper()}, "
              f"{embedder.params / 1e6:.0f}M parameters in {embedder.dtype}, batch {d.embed_batch_size}")
    if device == "gpu":
        runtime = cfg.plan.assume.gpu_runtime_gib * GiB
        mem = cluster.gpu_group.gpu_memory_gib
        c.need_gib, c.have_gib = (weights + act + runtime) / GiB, mem
        c.lines.append(f"per GPU: weights {gib(weights)} + activations {gib(act)} + runtime {gib(runtime)} = {c.need_gib:.1f}"
                       + (f" of {mem:g} GiB" if mem else " GiB"))
        if mem and c.need_gib > mem:
            c.fits, c.problem = False, (f"the rationale embedder needs {c.need_gib:.1f} GiB per GPU, the GPUs have {mem:g}: "
                                        f"lower distill.embed_batch_size (now {d.embed_batch_size})")
        c.summary = f"embedder on {actors} GPUs"
    else:
        c.need_gib, c.have_gib = (weights + act) / GiB, cluster.cpu_memory_gib
        c.lines.append(f"host memory: weights {gib(weights)} + activations {gib(act)} GiB")
        c.summary = f"embedder on 1 CPU, {gib(weights + act)} GiB RAM"
    return c, actors
