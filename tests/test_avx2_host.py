"""bench/avx2_host.py: an AVX-512 machine put on an AVX2-only host's software paths (the README's slow-host times)."""
import os

import pytest

from bench.avx2_host import ROOT, check, emulation_env
from hardware.cpu import cpu_info


@pytest.mark.vllm  # imports vLLM's kernel library in a child process (~10 s), no engine
def test_the_emulation_takes_the_avx2_paths_of_thinkbroad_torch_and_vllm():
    seen = check(emulation_env())
    assert "[AVX2-only emulation]" in seen["cpu"] and "-> torch float32, vLLM float32" in seen["cpu"]
    assert seen["torch_capability"] == "AVX2" and seen["vllm_kernels"] == ["_C_AVX2.abi3.so"]
    if any(f.startswith("avx512") for f in cpu_info().flags):  # without it, this host's own paths: the check says so
        with pytest.raises(SystemExit, match="thinkbroad still sees AVX-512.*torch's kernels are not AVX2.*did not load _C_AVX2"):
            check({**os.environ, "PYTHONPATH": str(ROOT)})
