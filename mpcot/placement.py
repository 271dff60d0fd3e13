"""Where a vLLM engine runs: the one place that knows CPU vs GPU for generation.

Returns plain Ray remote arguments, environment variables and engine defaults; the stage stays device-agnostic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from hardware.cpu import cpu_info


# Every engine, CPU or GPU: our structured-output regex (a rationale of up to generation.rationale_max_chars
# characters, then one label title) is ours, not a caller's, and its bounded repetition takes xgrammar seconds to
# compile: on a loaded 2-core host it passed vLLM's 5 s guard against hostile patterns and failed the whole stage.
ENGINE_ENV = {"VLLM_REGEX_COMPILATION_TIMEOUT_S": "300"}


@dataclass(frozen=True)
class EnginePlacement:
    device: str  # "cpu" or "gpu"
    remote_args: dict = field(default_factory=dict)  # num_cpus / num_gpus for the actor holding vllm.LLM
    env: dict = field(default_factory=lambda: dict(ENGINE_ENV))  # set in the actor before vllm is imported
    engine_defaults: dict = field(default_factory=dict)  # vllm.LLM kwargs the user's `engine:` may override
    # an engine actor may stop its engine and start another model's in the same process (mpcot/generate.py
    # run_generations): on CPU, where the engine runs inside the actor and frees its memory when it stops; not on GPU,
    # where a stopped engine's CUDA memory and distributed state are not reliably released (a fresh actor per model)
    switches_models: bool = False


def resolve_device(accelerator: str, cluster_gpus: float) -> str:
    if accelerator == "auto":
        return "gpu" if cluster_gpus > 0 else "cpu"
    return accelerator


def engine_placement(
    accelerator: str, cluster_cpus: float, cluster_gpus: float, concurrency: int,
    cpus_per_engine: int | None, gpus_per_engine: int, node_cpus: float | None = None,
) -> EnginePlacement:
    """`node_cpus`: the most CPUs any one node has (an engine cannot span nodes); None = the cluster is one node."""
    device = resolve_device(accelerator, cluster_gpus)
    if device == "cpu":
        # vLLM-CPU binds one OpenMP thread per core: give each engine an even share of the cores, but no more than
        # one node holds (on a two-node cluster of 1 CPU each, an engine asking for 2 would never be scheduled).
        cpus = cpus_per_engine or max(1, min(int(cluster_cpus) // concurrency, int(node_cpus or cluster_cpus)))
        return EnginePlacement(
            device="cpu",
            remote_args={"num_cpus": cpus},
            switches_models=True,
            env={
                **ENGINE_ENV,
                "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default (4) is too much for small machines
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "OMP_NUM_THREADS": str(cpus),
                # the engine core runs inside the actor instead of a spawned process: one `import vllm` less per
                # engine (25 -> 5 s engine start for the tiny test model on 2 loaded cores) and no child process
                # that outlives the actor and prints resource_tracker KeyErrors when Ray Data tears the pool down;
                # VLLM_ENABLE_V1_MULTIPROCESSING=1 on the driver gives the engine its own process again
                "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
            },
            # the dtype this CPU generates fastest in (hardware/cpu.py); decided on the driver's CPU, so a cluster of
            # mixed processors sets generation.engine.dtype itself
            # no chunked prefill: a prompt split across steps has its first sampled token discarded, and vLLM then
            # rewinds the request's seeded generator, which a CPU generator cannot do ("CPU Generator does not use
            # offset": the DPO resample crashed); whole prompts only, so the step budget covers the longest one
            engine_defaults={"enforce_eager": True, "max_model_len": 2048, "dtype": cpu_info().generation_dtype,
                             "enable_chunked_prefill": False},
        )
    if gpus_per_engine == 1:
        return EnginePlacement(device="gpu", remote_args={"num_cpus": 1, "num_gpus": 1}, engine_defaults={"max_model_len": 4096})
    # Tensor parallel: vLLM places its own Ray workers on the GPUs, so the actor itself holds none.
    return EnginePlacement(
        device="gpu",
        remote_args={"num_cpus": 1},
        engine_defaults={
            "max_model_len": 4096,
            "tensor_parallel_size": gpus_per_engine,
            "distributed_executor_backend": "ray",
        },
    )


def engine_kwargs(place: EnginePlacement, user: dict) -> dict:
    """The engine's kwargs: the placement's defaults under the user's `generation.engine`; without chunked prefill
    the step's token budget must hold the longest prompt (vLLM refuses a budget below max_model_len)."""
    kwargs = {**place.engine_defaults, **user}
    if kwargs.get("enable_chunked_prefill") is False and "max_model_len" in kwargs:
        batch = kwargs.get("max_num_batched_tokens") or vllm_batch_defaults(place.device)[0]
        kwargs["max_num_batched_tokens"] = max(batch, kwargs["max_model_len"])
    return kwargs


def vllm_batch_defaults(device: str, gpu_name: str = "", gpu_memory_gib: float = 0.0, world_size: int = 1) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) that vLLM 0.32 gives an offline `vllm.LLM` when the engine's kwargs set
    neither (vllm/engine/arg_utils.py `get_batch_defaults`, usage context LLM_CLASS): >= 160 GiB GPUs, and >= 70 GiB
    GPUs other than the A100, 16384 / 1024; other GPUs 8192 / 256; CPU 4096 / 256 per tensor-parallel rank."""
    if device == "cpu":
        return 4096 * world_size, 256 * world_size
    if gpu_memory_gib >= 160 or (gpu_memory_gib >= 70 and "a100" not in gpu_name.lower()):
        return 16384, 1024
    return 8192, 256
