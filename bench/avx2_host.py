"""Benchmark: a command timed as it would run on an AVX2-only x86 host, on this AVX-512 machine. The slowest host we
know is a 2-core AVX2-only Zen 3 (the demo's generation 1.8x slower than on the Zen 4: vLLM's AVX2 kernels, not the
matmul); when no such host is at hand, this puts the command on that host's software paths
(bench/emulate_avx2/sitecustomize.py: thinkbroad's dtype and profile choices without AVX-512 flags, vLLM's
`_C_AVX2` kernels, torch/oneDNN/MKL held to AVX2) and times it. The cores stay this machine's: a real Zen 3 runs
scalar Python slower too, so read the time as a lower bound for such a host.

    .venv/bin/python bench/avx2_host.py --name suite -- .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25
    .venv/bin/python bench/avx2_host.py --name demo -- .venv/bin/thinkbroad run --config configs/local.yaml ...

First checks in a fresh process that the paths are taken (else it stops with the reason), then runs the command with
its output passed through. Writes bench/results/avx2_host_<name>.json (and docs/ with --docs) and prints one line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HERE = ROOT / "bench" / "emulate_avx2"
# torch's ATen kernels, oneDNN and MKL read these at start-up (the sitecustomize handles what reads CPUID instead)
ISA_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# in a fresh process under the emulation: what thinkbroad and vLLM chose (vLLM's kernel library is loaded by
# import_kernels, the call its engine makes first; the library's name shows in the process's memory map)
CHECK = """
import json, torch
from hardware.cpu import cpu_info
from vllm.platforms.cpu import CpuPlatform
CpuPlatform.import_kernels()
maps = open("/proc/self/maps").read()
libs = sorted({l.rsplit("/", 1)[-1] for l in maps.splitlines() if "/vllm/_C" in l})
print(json.dumps({"cpu": cpu_info().describe(), "flags": sorted(cpu_info().flags),
                  "torch_capability": torch.backends.cpu.get_cpu_capability(), "vllm_kernels": libs}))
"""


def emulation_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the AVX2-only paths: the sitecustomize folder first on PYTHONPATH (Ray's
    workers inherit it from the process that starts Ray), the ISA variables set."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, **ISA_ENV}


def check(env: dict[str, str]) -> dict:
    """What a fresh process under `env` chose; raises SystemExit naming what the emulation failed to change."""
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"the emulation check failed:\n{out.stderr[-3000:]}")
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    avx512 = any(f.startswith(("avx512", "amx")) for f in seen["flags"])
    wrong = [what for what, ok in (("thinkbroad still sees AVX-512", not avx512),
                                   ("torch's kernels are not AVX2", seen["torch_capability"] == "AVX2"),
                                   ("vLLM did not load _C_AVX2", any("_C_AVX2" in lib for lib in seen["vllm_kernels"])))
             if not ok]
    if wrong:
        raise SystemExit(f"the AVX2-only paths are not taken ({'; '.join(wrong)}): {seen}")
    return {k: v for k, v in seen.items() if k != "flags"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="what the command is (the result file's name): suite, demo, ...")
    ap.add_argument("--docs", action="store_true", help="also write docs/avx2_host_<name>.json")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    from hardware.cpu import machine

    env = emulation_env()
    seen = check(env)
    print(f"[avx2_host] {seen['cpu']}; torch {seen['torch_capability']}; vLLM {', '.join(seen['vllm_kernels'])}", flush=True)
    start = time.time()
    rc = subprocess.run(command, env=env, cwd=ROOT).returncode
    wall = time.time() - start
    result = {"name": args.name, "command": command, "returncode": rc, "wall_s": round(wall, 1), "emulated": seen,
              "host": machine(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start))}
    text = json.dumps(result, indent=2) + "\n"
    out = ROOT / "bench" / "results" / f"avx2_host_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.docs:
        (ROOT / "docs" / f"avx2_host_{args.name}.json").write_text(text)
    print(f"avx2_host {args.name}: exit {rc} in {int(wall // 60)} min {wall % 60:.0f} s on the AVX2-only paths of "
          f"{result['host']['cpu'].split(';')[0]} (a lower bound for a real AVX2-only host: the cores are this one's)")
    sys.exit(rc)


if __name__ == "__main__":
    main()
