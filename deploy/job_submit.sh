#!/usr/bin/env bash
# Submit pdserve as a Ray job to a running Ray cluster (`ray start --head`, `ray up`, KubeRay).
#
#   deploy/job_submit.sh [CONFIG] [extra `pdserve serve` flags, e.g. --port 50052]
#
# RAY_DASHBOARD: the cluster's job API (default http://127.0.0.1:8265; for a remote cluster
# forward the port: `ray attach deploy/ray-cluster.yaml -p 8265` or
# `kubectl port-forward svc/pdserve-head-svc 8265`). The checkout is uploaded as the job's
# working dir; Ray leaves out what .gitignore lists (.venv, bench/results, caches) and .git.
#
# Ray token auth: the job CLI sends `Authorization: Bearer <token>` only when
# RAY_AUTH_MODE=token, with the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
# else ~/.ray/auth_token (`ray get-auth-token` prints it). A cluster started without token
# auth ignores the header.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/ray-job.yaml}
shift || true
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" \
    --working-dir . --no-wait \
    -- python -m pdserve.cluster serve "$config" "$@"
