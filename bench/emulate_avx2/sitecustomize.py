"""Loaded by every Python process of a run whose PYTHONPATH starts with this folder (bench/avx2_host.py sets it, and
Ray's workers inherit it): this AVX-512 machine takes the software paths of an AVX2-only x86 host.

- thinkbroad's own choices (hardware/cpu.py: torch dtype, vLLM dtype, the demo profile's speed factor) see the CPU
  flags without the AVX-512 and AMX ones;
- vLLM loads its AVX2 kernel library (`vllm._C_AVX2`; it decides by `torch.cpu._is_avx512_supported()`, which reads
  CPUID, so that answer is replaced);
- torch's own kernels and oneDNN/MKL are held to AVX2 by their environment variables (ATEN_CPU_CAPABILITY,
  ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), which the runner sets beside PYTHONPATH.

What it cannot change: the cores themselves (an older core runs scalar Python, imports and process starts slower;
not measured here). Nothing here is imported by thinkbroad itself.
"""
import functools
import importlib.abc
import importlib.machinery
import sys

_AVX512 = ("avx512", "amx")


def _patch_hardware_cpu(module) -> None:
    """This machine's CpuInfo without the AVX-512/AMX flags (parse_cpuinfo itself is left alone: tests feed it text)."""
    real = module.cpu_info

    @functools.cache
    def cpu_info():
        info = real()
        flags = frozenset(f for f in info.flags if not f.startswith(_AVX512))
        return module.CpuInfo(model=info.model + " [AVX2-only emulation]", flags=flags, cores=info.cores)

    module.cpu_info = cpu_info


def _patch_torch_cpu(module) -> None:
    module._is_avx512_supported = lambda: False
    module._is_avx512_bf16_supported = lambda: False
    module._is_amx_tile_supported = lambda: False


_PATCHES = {"hardware.cpu": _patch_hardware_cpu, "torch.cpu": _patch_torch_cpu}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patch):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, _PATCHES[name])
        return spec


sys.meta_path.insert(0, _Finder())
