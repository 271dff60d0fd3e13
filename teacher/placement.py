"""The one place teacher training knows about devices: CPU (gloo) vs GPU (NCCL), DeepSpeed config, precision (on
CPU from the processor's flags, through hardware/cpu.py).

Everything here returns plain values; the train loop calls these and stays device-agnostic.
"""
from __future__ import annotations

from teacher.config import DistributedSettings


def resolve_device(accelerator: str, cluster_gpus: float) -> str:
    if accelerator == "auto":
        return "gpu" if cluster_gpus > 0 else "cpu"
    return accelerator


def scaling_config(dist: DistributedSettings, device: str):
    from ray.train import ScalingConfig

    resources = {"CPU": dist.cpus_per_worker}
    if device == "gpu":
        resources["GPU"] = 1
    return ScalingConfig(num_workers=dist.num_workers, use_gpu=device == "gpu", resources_per_worker=resources)


def torch_config(device: str):
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if device == "gpu" else "gloo")


def init_worker(device: str) -> None:
    """Inside a Ray Train worker, before the TRL config is built.

    On CPU, accelerate treats the run as a single process unless DeepSpeed's process group is set up first
    (symptom: `train_batch_size ... 2 != 2*1*2`); initialising it over gloo fixes that without patching.

    DeepSpeed's CPU backend compiles its shared-memory all-reduce op there (25-45 s of C++ on 2 cores, again each
    time another `ninja` on PATH finds the cache: the venv's and the system's differ). Only its inference all-reduce
    uses that op, never training, so it is marked unavailable here and the run starts without the compile.
    """
    if device == "cpu":
        import deepspeed
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False  # read by deepspeed/comm/torch.py build_shm_op
        deepspeed.init_distributed(dist_backend="gloo")


def use_bf16(dist: DistributedSettings, device: str) -> bool:
    """`auto`: on GPUs that support bf16, and on CPUs with native bf16 (hardware/cpu.py: a SmolLM2 training step
    measured 3.2x faster in bf16 than in fp32 with AVX-512 BF16; emulated bf16 is slower than fp32)."""
    if dist.bf16 in ("on", "off"):
        return dist.bf16 == "on"
    if device == "cpu":
        from hardware.cpu import cpu_info

        return cpu_info().native_bf16  # asked inside the worker: the CPU of the node that trains
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def trainer_kwargs(dist: DistributedSettings, device: str) -> dict:
    """Keyword arguments for TRL's SFTConfig/DPOConfig that depend on the device."""
    bf16 = use_bf16(dist, device)
    kwargs = {"use_cpu": device == "cpu", "bf16": bf16, "fp16": False}
    if dist.zero_stage:
        kwargs["deepspeed"] = deepspeed_config(dist, bf16)
    return kwargs


def deepspeed_config(dist: DistributedSettings, bf16: bool) -> dict:
    zero: dict = {"stage": dist.zero_stage}
    if dist.zero_stage == 3:
        # consolidated weights on save, so the export is a plain model folder rather than ZeRO shards
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if dist.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if dist.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
    }


def model_dtype(dist: DistributedSettings, device: str):
    import torch

    return torch.bfloat16 if use_bf16(dist, device) else torch.float32


def peak_memory_mb(device: str) -> dict:
    """This process's peak host memory (RSS) and, on GPU, peak allocated device memory, in MiB."""
    import resource

    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "gpu":
        import torch

        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def model_states_bytes(zero_stage: int, offload: bool, params: int, largest_layer: int, gpus_per_node: int,
                       nodes: int = 1, trainable: int | None = None, weight_bytes: int = 2) -> tuple[int, int]:
    """(bytes per GPU, bytes of host memory per node) for parameters, gradients and optimizer states of one training
    job of `gpus_per_node` x `nodes` workers, as DeepSpeed's own estimators count them
    (deepspeed/runtime/zero/stage_1_and_2.py `estimate_zero2_model_states_mem_needs`, stage3.py
    `estimate_zero3_model_states_mem_needs`; additional_buffer_factor 1.5, zero_init on, as HF's Trainer loads under
    ZeRO-3): ZeRO-2 2P + 18P/G per GPU, ZeRO-3 4 x largest layer + 18P/G; offload keeps 2P (ZeRO-2) or the largest
    layer (ZeRO-3, parameters offloaded too) on the GPU.

    `trainable` (LoRA): the estimator's per-parameter bytes apply to the trainable parameters only; the frozen base
    keeps its 16-bit weights, replicated under ZeRO-2, partitioned under ZeRO-3. `weight_bytes` 4 (fp32 training,
    no bf16): the same accounting with 4-byte weights and gradients and no separate fp32 master copy.
    ZeRO stage 0 (plain DDP, torch AdamW in the weights' dtype): weights, gradients, two Adam moments and DDP's
    gradient buckets on every GPU."""
    p, t = params, params if trainable is None else trainable
    frozen = p - t
    g = gpus_per_node * nodes
    w = weight_bytes
    # per trainable parameter, partitioned: 16-bit grads + fp32 grads, fp32 master weights, fp32 Adam moments (18);
    # in fp32 there is no master copy and one gradient copy (4 + 8 = 12)
    sharded = 18 if w == 2 else 12
    if zero_stage == 0:
        return w * p + 4 * w * t, 0
    if zero_stage == 2:
        if offload:
            return w * p, int(t * max(4 * g, 16) * 1.5)
        return w * p + int(sharded * t / g), int(p * 4 * gpus_per_node * 1.5)  # host: each process loads the model
    layer = 2 * w * largest_layer  # a gathered layer: weights and gradients
    if offload:
        return layer, int(t * 18 * (1 / nodes) * 1.5) + w * frozen // nodes
    return layer + int(sharded * t / g) + w * frozen // g, int(largest_layer * 4 * gpus_per_node * 1.5)


def comm_buffer_bytes(zero_stage: int) -> int:
    """DeepSpeed's communication buffers per GPU at its defaults (deepspeed_config sets no bucket size): ZeRO-2
    reduce + allgather buckets of 5e8 elements each; ZeRO-3 (overlap_comm on by default) a double reduce bucket of
    5e8 and the 5e7-element prefetch bucket; 16-bit elements."""
    if zero_stage == 2:
        return 2 * (5 * 10**8 + 5 * 10**8)
    if zero_stage == 3:
        return 2 * (2 * 5 * 10**8 + 5 * 10**7)
    return 0
