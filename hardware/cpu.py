"""The processor's features, read from /proc/cpuinfo: the one place that decides which precision is fast on a CPU.

bf16 is fast only with native support (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm); elsewhere torch and
vLLM emulate it, several times slower than fp32 (the demo's generation took 849 s instead of 97 s on an AVX2-only
EPYC). fp16 without AVX-512 FP16 is emulated too: measured 0.14x fp32 in vLLM. What we measured decides the rest
(docs/results.md, "Generation dtype by processor"): with native bf16, torch runs the student 2.6x faster in bf16
than in fp32, but vLLM-CPU generated 0.70x as fast in bf16 as in fp32 on AVX-512 BF16 without AMX, so vLLM gets
bf16 only with AMX (the path vLLM's CPU backend is built for; not measured by us).
Used by mpcot/placement.py (vLLM dtype), teacher/placement.py (training precision), serve (inference precision),
the benchmarks and `make demo` (`python -m hardware.cpu` prints the line they show).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache

NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm BF16
# the flags that decide a path here, shown in every benchmark line and at the start of `make demo`
SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "bf16")


class PrecisionError(ValueError):
    """A precision this machine cannot run well (or at all); the message says what to use instead."""


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int  # cores this process may run on

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in NATIVE_BF16)

    @property
    def torch_dtype(self) -> str:
        """torch on this CPU (student serving, teacher training): bfloat16 with native bf16, else float32."""
        return "bfloat16" if self.native_bf16 else "float32"

    @property
    def generation_dtype(self) -> str:
        """vLLM-CPU generation: bfloat16 only with AMX, else float32 (see the module's docstring)."""
        return "bfloat16" if "amx_bf16" in self.flags else "float32"

    def describe(self) -> str:
        """One line: model, cores, the deciding flags, and the dtypes chosen from them."""
        shown = " ".join(f for f in SHOWN if f in self.flags) or "none of " + " ".join(SHOWN)
        bf16 = "native" if self.native_bf16 else "emulated (no avx512_bf16/amx_bf16)"
        return (f"CPU: {self.model}, {self.cores} cores; flags: {shown}; bf16 {bf16} -> torch {self.torch_dtype}, "
                f"vLLM {self.generation_dtype}")


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """/proc/cpuinfo text (x86 `model name`/`flags`, Arm `Features`) -> CpuInfo of its first processor."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: all cores of a machine report the same features
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or fields.get("Model") or platform.processor() or "unknown"
    if "cpu family" in fields:  # virtual machines often hide the name ("AMD EPYC"): family/model tell the generation
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    return CpuInfo(model=model, flags=flags, cores=cores)


@cache
def cpu_info() -> CpuInfo:
    """This machine's processor; without /proc/cpuinfo (not Linux) no flags are known and bf16 counts as emulated."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, cores)


def require_native_bf16(what: str) -> None:
    """Raise PrecisionError naming `what` when this CPU would only emulate bf16."""
    info = cpu_info()
    if not info.native_bf16:
        raise PrecisionError(f"{what}: bf16 on this CPU ({info.model}) would be emulated and slower than fp32: it has none "
                         f"of the flags {', '.join(NATIVE_BF16)}; use fp32 (or int8 with the onnxruntime backend)")


def machine() -> dict:
    """What a benchmark records beside its numbers: the CPU line, its flags and the load average (1/5/15 min)."""
    info = cpu_info()
    return {"cpu": info.describe(), "cpu_flags": sorted(f for f in SHOWN if f in info.flags),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def threads() -> int:
    """Threads an inference session should use: OMP_NUM_THREADS (Ray sets it to an actor's num_cpus), else the cores."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else cpu_info().cores


if __name__ == "__main__":
    print(cpu_info().describe())
