"""Hours: generation as tokens at a rate per GPU, training as FLOPs at a share of the GPU's peak.

A generation rate comes from `plan.throughput.generation_tokens_per_s` for the cluster's GPU kind. A kind without one
gets it from a kind of the same chip that has one (the A100-40G from the A100-80G, the H200 from the H100), scaled by
what differs between them: the memory left for KV cache after the weights, hence the sequences decoded at once, and the
memory bandwidth. Both sides are put through the same decode roofline (`decode_roofline`), so only the ratio is used
and the published figure keeps its absolute level.
"""
from __future__ import annotations

from dataclasses import dataclass

from hardware.gpu import GPUS, GpuKind
from workflows.cluster import Cluster, NodeGroup
from workflows.config import RunConfig
from workflows.plan.common import GiB
from workflows.plan.engines import engine_dtype, engine_memory
from workflows.plan.inputs import Lengths
from workflows.shapes import ModelShape


@dataclass(frozen=True)
class Decode:
    """One engine's decode step on one kind of GPU, per GPU."""

    kind: GpuKind
    kv_gib: float  # what the KV cache gets
    kv_tokens: int
    max_seqs: int  # vLLM's max_num_seqs for this GPU
    seqs: int  # sequences decoded at once: the fewer of max_num_seqs and what the KV cache holds
    context: float  # mean tokens of KV each sequence reads per step
    step_s: float
    tokens_per_s: float


def decode_roofline(cfg: RunConfig, shape: ModelShape, kind: GpuKind, lengths: Lengths) -> Decode:
    """The decode step of one engine (tensor parallel `generation.gpus_per_engine`) on `kind`:

        KV tokens   = (gpu_memory_utilization x memory - weights - profile activations - runtime) / KV bytes per token
        n           = min(max_num_seqs, KV tokens / (prompt + answer))     each running sequence at its longest
        bytes/step  = weights + n x (prompt + answer / 2) x KV bytes per token   (per GPU: weights and KV heads / TP)
        FLOPs/step  = 2 x matmul parameters / TP x n
        step        = max(bytes/step / bandwidth, FLOPs/step / bf16 peak)
        tokens/s    = n / step / TP                                         per GPU

    Memory-bound at small n (every step reads all the weights for few tokens), compute-bound at large n. The KV figures
    are engine_memory's, the ones the engine check prints."""
    g = cfg.generation
    tp = g.gpus_per_engine
    kw = {"max_model_len": 4096, **g.engine}  # mpcot/placement.py's GPU defaults, then the config's
    _, db = engine_dtype(shape, kw, "gpu")
    m = engine_memory(cfg, shape, kw, NodeGroup(kind.name, 1, 0, tp, kind, kind.memory_gib), tp, db)
    held = lengths.prompt_mean + lengths.completion
    seqs = max(0, min(m["seqs"], int(m["tokens"] // held)))
    context = lengths.prompt_mean + lengths.completion / 2
    step_bytes = m["weights"] + seqs * context * m["per_token"]
    step_flops = 2 * shape.matmul_params / tp * seqs
    step = max(step_bytes / (kind.memory_gbps * 1e9), step_flops / (kind.bf16_tflops * 1e12))
    return Decode(kind, max(m["kv"], 0) / GiB, m["tokens"], m["seqs"], seqs, context, step, seqs / step / tp)


@dataclass(frozen=True)
class Rate:
    tokens_per_s: float | None
    how: str  # for the table's rate column
    derivation: str = ""  # for the notes, when derived


class Timer:
    """Hours for generation (tokens at a throughput per GPU) and for training (FLOPs at a share of the peak)."""

    def __init__(self, cfg: RunConfig, cluster: Cluster, lengths: Lengths):
        self.cfg, self.cluster, self.lengths = cfg, cluster, lengths
        group = cluster.gpu_group
        self.kind = group.gpu if group else None
        minutes = {"gpu": 5.0, "cpu": 0.5} | cfg.plan.assume.startup_minutes
        self.startup_h = {device: m / 60 for device, m in minutes.items()}
        self._rates: dict[str, Rate] = {}

    def rate(self, shape: ModelShape) -> Rate:
        """Prompt + completion tokens/s per GPU of the cluster's kind for this model: given, or derived from a kind of
        the same chip (module docstring)."""
        if shape.name not in self._rates:
            self._rates[shape.name] = self._rate(shape)
        return self._rates[shape.name]

    def _rate(self, shape: ModelShape) -> Rate:
        given = self.cfg.plan.throughput.generation_tokens_per_s
        kind = self.kind
        if kind is None:
            return Rate(None, "no plan.throughput.generation_tokens_per_s for this GPU")
        if kind.name in given:
            return Rate(given[kind.name], f"{given[kind.name]:,.0f} tokens/s per GPU ({kind.name})")
        ref = next((GPUS[k] for k in given if k in GPUS and GPUS[k].chip == kind.chip), None)
        if ref is None:
            return Rate(None, f"no plan.throughput.generation_tokens_per_s for {kind.name} (nor for another {kind.chip} "
                              "kind to derive it from)")
        mine, theirs = decode_roofline(self.cfg, shape, kind, self.lengths), decode_roofline(self.cfg, shape, ref, self.lengths)
        if not mine.seqs:
            return Rate(None, f"{kind.name}: the KV cache holds no whole sequence")
        tps = given[ref.name] * mine.tokens_per_s / theirs.tokens_per_s

        def side(d: Decode) -> str:
            held = self.lengths.prompt_mean + self.lengths.completion
            at_once = f"max_num_seqs {d.max_seqs} sequences" if d.seqs == d.max_seqs else f"{d.seqs} sequences of {held:.0f} tokens"
            return (f"{d.kind.name}: KV {d.kv_gib:.1f} GiB = {d.kv_tokens:,} tokens, {at_once} at once, "
                    f"{d.kind.memory_gbps:,.0f} GB/s, {d.step_s * 1e3:.1f} ms a step, {d.tokens_per_s:,.0f} tokens/s")

        derivation = (f"{kind.name} generation rate derived, not published: {given[ref.name]:,.0f} tokens/s ({ref.name}, "
                      f"plan.throughput) x {mine.tokens_per_s / theirs.tokens_per_s:.2f} (decode roofline {side(mine)}; "
                      f"{side(theirs)}) = {tps:,.0f} tokens/s per GPU")
        return Rate(tps, f"{tps:,.0f} tokens/s per GPU ({kind.name}, derived from {ref.name} by KV capacity)", derivation)

    def generation(self, tokens: float, device: str, units: int, shape: ModelShape, loads: int = 1) -> tuple[float | None, str]:
        """`units`: GPUs (gpu) or CPU cores (cpu) the engines hold."""
        t = self.cfg.plan.throughput
        if device == "gpu":
            rate = self.rate(shape)
            if rate.tokens_per_s is None:
                return None, rate.how
            return tokens / (rate.tokens_per_s * units) / 3600 + loads * self.startup_h["gpu"], rate.how
        seconds = tokens * 2 * shape.matmul_params / (units * t.cpu_gflops_per_core * 1e9)
        return seconds / 3600 + loads * self.startup_h["cpu"], f"2 x params FLOPs per token, {t.cpu_gflops_per_core:g} GFLOPS x {units} cores"

    def flops(self, flops: float, device: str, units: int, mfu: float) -> tuple[float | None, str]:
        """`units`: GPUs (gpu) or CPU cores (cpu)."""
        t = self.cfg.plan.throughput
        if device == "gpu":
            if self.kind is None:
                return None, "GPU kind unknown"
            return flops / (units * self.kind.bf16_tflops * 1e12 * mfu) / 3600 + self.startup_h["gpu"], \
                f"{mfu:.0%} of {self.kind.bf16_tflops:g} TFLOPS bf16 per GPU"
        return flops / (max(1, units) * t.cpu_gflops_per_core * 1e9) / 3600 + self.startup_h["cpu"], \
            f"{t.cpu_gflops_per_core:g} GFLOPS per core x {max(1, units)}"
