"""Memory of the vLLM engines (generate; pass@k resampling in dpo; teacher_eval; the targets in distill), in vLLM's
own order of accounting: weights, the profile run's activations and a runtime allowance out of
`gpu_memory_utilization` x the GPU's memory; what is left is KV cache."""
from __future__ import annotations

import math

from mpcot.placement import engine_placement, vllm_batch_defaults
from workflows.cluster import Cluster, NodeGroup
from workflows.config import RunConfig
from workflows.plan.common import Check, GiB, gib
from workflows.plan.inputs import Lengths
from workflows.shapes import DTYPE_BYTES, ModelShape


def engine_dtype(shape: ModelShape, kw: dict, device: str) -> tuple[str, int]:
    """The dtype an engine runs the model in, and its bytes: the engine's `dtype`, else the checkpoint's."""
    dtype = kw.get("dtype", "auto")
    dtype = shape.dtype if dtype == "auto" else dtype
    if device == "gpu" and DTYPE_BYTES.get(dtype, 4) == 4:
        dtype = "bfloat16"  # vLLM runs a float32 checkpoint in 16-bit on GPUs unless dtype says float32
    return dtype, DTYPE_BYTES.get(str(dtype).replace("torch.", ""), 2)


def engine_check(cfg: RunConfig, shape: ModelShape, cluster: Cluster, lengths: Lengths, what: str) -> Check:
    """A pool of vLLM engines (generate; and with the trained teachers in dpo, teacher_eval, distill)."""
    g = cfg.generation
    group = cluster.gpu_group
    place = engine_placement(g.accelerator, cluster.cpus, cluster.gpus, g.concurrency, g.cpus_per_engine,
                             g.gpus_per_engine, cluster.node_cpus)
    kw = {**place.engine_defaults, **g.engine}
    seq = math.ceil(lengths.prompt_max + g.max_tokens)
    max_len = int(kw.get("max_model_len", 4096))
    dtype, db = engine_dtype(shape, kw, place.device)
    if place.device == "cpu":
        return _cpu_engine_check(cfg, shape, cluster, place, kw, db, dtype, seq, what)
    tp = g.gpus_per_engine
    want = g.concurrency * tp
    c = Check(what, "gpu", f"{g.concurrency} vLLM engines x TP {tp} = {want} of {cluster.gpus} GPUs, "
                           f"{place.remote_args.get('num_cpus', 1)} CPU each (Ray Data actors)")
    if want > cluster.gpus:
        fit = max(1, cluster.gpus // tp)
        c.fits, c.problem = False, (f"generation.concurrency {g.concurrency} x gpus_per_engine {tp} = {want} GPUs, the "
                                    f"cluster has {cluster.gpus}: set generation.concurrency: {fit}")
        if not cluster.gpus:
            c.problem = (f"generation.accelerator is gpu and {cluster.source} has no GPU: plan it for a GPU cluster "
                         "(--cluster cluster.yaml or --nodes/--gpus-per-node/--gpu-memory-gb), or set generation.accelerator: auto")
        return c
    if group and tp > group.gpus:
        c.fits, c.problem = False, (f"tensor parallel {tp} spans nodes of {group.gpus} GPUs: set generation.gpus_per_engine "
                                    f"to at most {group.gpus}")
        return c
    mem = group.gpu_memory_gib if group else None
    if mem is None:
        c.lines.append("GPU memory unknown: not checked")
        c.summary = f"{g.concurrency} engines x TP {tp}; memory not checked"
        return c
    m = engine_memory(cfg, shape, kw, group, tp, db)
    c.need_gib, c.have_gib = (m["weights"] + m["act"] + m["runtime"]) / GiB, m["budget"] / GiB
    c.lines += [f"per GPU: weights {gib(m['weights'])} ({shape.params / 1e9:.2f}B x {db} B{f' / TP {tp}' if tp > 1 else ''}) + "
                f"profile-run activations {gib(m['act'])} ({m['batched']} batched tokens, {m['seqs']} sequences) + runtime "
                f"{gib(m['runtime'])} = {c.need_gib:.1f} of {c.have_gib:.1f} GiB (gpu_memory_utilization {m['util']:g} x {mem:g} GiB)",
                f"KV cache {gib(max(m['kv'], 0))} GiB at {m['per_token'] / 1024:g} KiB per token (2 x {shape.layers} layers x "
                f"{max(1, shape.kv_heads // tp)} KV heads x {shape.head_dim} x {db} B) = {m['tokens']:,} tokens"]
    if m["tokens"] < max_len:
        c.fits = False
        c.problem = (f"{what}: {shape.params / 1e9:.1f}B parameters in {dtype} need {c.need_gib:.1f} GiB per GPU before any "
                     f"KV cache, more than gpu_memory_utilization {m['util']:g} x {mem:g} GiB leaves" if m["kv"] <= 0 else
                     f"{what}: the KV cache holds {m['tokens']:,} tokens, fewer than max_model_len {max_len} (vLLM refuses "
                     f"to start)") + ": " + _tensor_parallel_fix(cfg, shape, kw, cluster, db, max_len) + \
            (f", or set generation.engine.max_model_len: {m['tokens']}" if m["tokens"] >= seq else "")
        return c
    tokens, seqs = m["tokens"], m["seqs"]
    if seq > max_len and lengths.prompt_how == "tokenizer":
        c.fits, c.problem = False, (f"{what}: prompts of up to {lengths.prompt_max} tokens + max_tokens {g.max_tokens} exceed "
                                    f"max_model_len {max_len}: vLLM rejects them; set generation.engine.max_model_len: {seq}")
        return c
    at_once = min(seqs, tokens // seq)
    c.lines.append(f"= {tokens // seq:,} sequences of {seq:,} tokens (longest prompt + max_tokens) at once"
                   + (f"; max_num_seqs caps it at {seqs}" if seqs < tokens // seq else ""))
    if seq > max_len:
        c.lines.append(f"warning: the longest prompt (estimated) + max_tokens = {seq} > max_model_len {max_len}")
    c.summary = f"{g.concurrency} engines x TP {tp} on {want} of {cluster.gpus} GPUs, KV for {at_once} sequences each"
    return c


def engine_memory(cfg: RunConfig, shape: ModelShape, kw: dict, group: NodeGroup, tp: int, db: int) -> dict:
    """One GPU of a vLLM engine: what gpu_memory_utilization leaves for the KV cache after the weights, the profile
    run's activations and the runtime, and how many tokens of KV that is (vLLM's own order of accounting)."""
    util = float(kw.get("gpu_memory_utilization", 0.9))
    mem = group.gpu_memory_gib
    batched, seqs = vllm_batch_defaults("gpu", group.gpu.name if group.gpu else "", mem, tp)
    batched, seqs = int(kw.get("max_num_batched_tokens", batched)), int(kw.get("max_num_seqs", seqs))
    h, i = shape.hidden, shape.intermediate
    # the profile run: max_num_batched_tokens through one layer (residual + hidden, q/k/v, gate/up, activation) in the
    # model dtype, and the sampler's fp32 logits for max_num_seqs sequences
    act = batched * (2 * h + (shape.heads + 2 * shape.kv_heads) * shape.head_dim / tp + 3 * i / tp) * db + seqs * shape.vocab * 4
    m = {"util": util, "batched": batched, "seqs": seqs, "weights": shape.params * db / tp, "act": act,
         "runtime": cfg.plan.assume.gpu_runtime_gib * GiB, "budget": util * mem * GiB, "per_token": shape.kv_bytes_per_token(db, tp)}
    m["kv"] = m["budget"] - m["weights"] - act - m["runtime"]
    m["tokens"] = max(0, int(m["kv"] // m["per_token"]))
    return m


def _tensor_parallel_fix(cfg: RunConfig, shape: ModelShape, kw: dict, cluster: Cluster, db: int, max_len: int) -> str:
    """The smallest tensor-parallel size within a node whose KV cache holds max_model_len, with the engines that fit."""
    group, g = cluster.gpu_group, cfg.generation
    tp = g.gpus_per_engine * 2
    while tp <= group.gpus:
        if engine_memory(cfg, shape, kw, group, tp, db)["tokens"] >= max_len:
            return (f"set generation.gpus_per_engine: {tp} (tensor parallel) and generation.concurrency: "
                    f"{max(1, min(g.concurrency, cluster.gpus // tp))}")
        tp *= 2
    return f"no tensor-parallel size within a node of {group.gpus} GPUs holds it: use GPUs with more memory or a smaller teacher"


def _cpu_engine_check(cfg, shape, cluster, place, kw, db, dtype, seq, what) -> Check:
    g = cfg.generation
    cpus = place.remote_args.get("num_cpus", 1)
    kv_gib = float(place.env.get("VLLM_CPU_KVCACHE_SPACE", 4))
    weights = shape.params * db
    batched, _ = vllm_batch_defaults("cpu")
    act = int(kw.get("max_num_batched_tokens", batched)) * (2 * shape.hidden + 3 * shape.intermediate) * db
    per_engine = weights + kv_gib * GiB + act
    total = per_engine * g.concurrency
    ram = cluster.cpu_memory_gib
    tokens = int(kv_gib * GiB // shape.kv_bytes_per_token(db))
    c = Check(what, "cpu", f"{g.concurrency} vLLM-CPU engine(s) x {cpus} CPUs of {cluster.cpus:g}",
              need_gib=total / GiB, have_gib=ram)
    c.lines += [f"per engine: weights {gib(weights)} ({shape.params / 1e6:.0f}M x {db} B, {dtype}) + KV cache {kv_gib:g} "
                f"(VLLM_CPU_KVCACHE_SPACE) + activations {gib(act)} = {gib(per_engine)} GiB; x {g.concurrency} = {gib(total)} GiB"
                + (f" of {ram:.0f} GiB RAM" if ram else ""),
                f"KV cache {tokens:,} tokens = {tokens // seq} sequences of {seq} tokens at once"]
    if ram and total / GiB > ram:
        c.lines.append(f"warning: more than this machine's RAM ({ram:.0f} GiB)")
    c.summary = f"{g.concurrency} vLLM-CPU engine(s) x {cpus} CPUs, {gib(total)} GiB RAM"
    return c
