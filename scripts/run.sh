#!/usr/bin/env bash
# Set up (if needed), then run the whole disaggregated path once: start a local cluster
# (Ray, 1 prefill + 1 decode worker, the bundled model), stream the answer to "prompt"
# through the router, say what happened, shut down.   bash scripts/run.sh "prompt"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pdserve demo "$@"
