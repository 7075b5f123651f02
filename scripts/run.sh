#!/usr/bin/env bash
# Set up (if needed) and generate text with the default model: bash scripts/run.sh "prompt"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pdserve.engine "$@"
