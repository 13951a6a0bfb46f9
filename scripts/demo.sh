#!/usr/bin/env bash
# The main job: convert the embedded SmolLM2-135M, show answers, fine-tune, show answers again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m lema.demo "$@"
