#!/usr/bin/env bash
# The whole test suite (tiny random models, plus end-to-end runs on the real default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
