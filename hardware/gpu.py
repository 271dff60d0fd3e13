"""GPUs: what a kind of GPU and a cloud instance type hold, and which GPUs this machine has (nvidia-smi).

The one place with GPU facts; `thinkbroad plan` (workflows/plan/) reads them to check a GPU run before anyone
rents the GPUs. Memory is the nominal size on the datasheet in GB, taken as GiB (nvidia-smi reports 81920 MiB for an
80 GB A100): within 2% of what the allocator sees. bf16 throughput is the dense (no sparsity) tensor-core peak; memory
bandwidth is the datasheet's (the SXM part where there are two); the chip says which kinds are one processor with
different memory (the plan derives one's generation rate from the other's by KV capacity and bandwidth).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuKind:
    name: str  # as Ray's accelerator_type names it, with the memory where Ray's name is ambiguous ("A100-80G")
    memory_gib: float
    bf16_tflops: float  # dense tensor-core peak, NVIDIA datasheets
    memory_gbps: float  # memory bandwidth, GB/s (10^9 bytes)
    chip: str  # the GPU processor: kinds of one chip differ in memory only


# NVIDIA datasheets: A100 SXM (312 TFLOPS bf16 dense; 40 GB HBM2 at 1,555 GB/s, 80 GB HBM2e at 2,039 GB/s; the p4d
# and p4de instances' parts), H100 SXM (989, 80 GB at 3.35 TB/s), H200 SXM (989, 141 GB at 4.8 TB/s), L40S (362,
# 48 GB GDDR6 at 864 GB/s).
GPUS = {g.name: g for g in (
    GpuKind("A100-40G", 40, 312, 1555, "GA100"), GpuKind("A100-80G", 80, 312, 2039, "GA100"),
    GpuKind("H100", 80, 989, 3350, "GH100"), GpuKind("H200", 141, 989, 4800, "GH100"), GpuKind("L40S", 48, 362, 864, "AD102"),
)}


@dataclass(frozen=True)
class InstanceType:
    gpus: int
    gpu: str  # a key of GPUS
    cpus: int  # vCPUs
    memory_gib: int  # host memory


# AWS EC2 accelerated-computing instance specifications (P4, P5, G6e pages).
INSTANCES = {
    "p4d.24xlarge": InstanceType(8, "A100-40G", 96, 1152),
    "p4de.24xlarge": InstanceType(8, "A100-80G", 96, 1152),
    "p5.48xlarge": InstanceType(8, "H100", 192, 2048),
    "p5e.48xlarge": InstanceType(8, "H200", 192, 2048),
    "p5en.48xlarge": InstanceType(8, "H200", 192, 2048),
    "g6e.12xlarge": InstanceType(4, "L40S", 48, 384),
    "g6e.48xlarge": InstanceType(8, "L40S", 192, 1536),
}


def kind_from_name(name: str, memory_gib: float | None = None) -> GpuKind | None:
    """A device or accelerator-type name ("NVIDIA A100-SXM4-80GB", "A100", "H100 80GB HBM3") -> its GpuKind, or None.
    An A100 without a size in its name needs `memory_gib` to tell 40 from 80 GB."""
    upper = name.upper()
    for key in ("H200", "H100", "L40S"):
        if key in upper:
            return GPUS[key]
    if "A100" in upper:
        size = re.search(r"(40|80)\s*G", upper)
        if size:
            return GPUS[f"A100-{size.group(1)}G"]
        if memory_gib:
            return GPUS["A100-80G" if memory_gib > 60 else "A100-40G"]
    return None


@dataclass(frozen=True)
class LocalGpu:
    name: str
    memory_gib: float


def local_gpus(timeout_s: float = 10.0) -> list[LocalGpu]:
    """The NVIDIA GPUs of this machine from nvidia-smi (no CUDA initialised); [] without nvidia-smi or GPUs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> list[LocalGpu]:
    """`name, memory.total [MiB]` lines -> LocalGpu per line."""
    gpus = []
    for line in text.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            gpus.append(LocalGpu(name.strip(), int(mib) / 1024))
    return gpus
