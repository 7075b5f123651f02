#!/usr/bin/env bash
# Set up (if needed) and run the whole CPU test suite. GPU tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1
# --durations: the slowest tests in every log, to keep the suite under its 30 minutes.
python -m pytest -q -m "not gpu" --durations=25 "$@"
