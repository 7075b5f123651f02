#!/usr/bin/env bash
# The serving benchmark of issue 5 on 2 GPUs, in one command: 1P1D (prefill on one GPU, decode
# on the other, KV over NCCL) against two colocated replicas, the same workload and seed,
# prefill-heavy and decode-heavy, each a Poisson rate sweep (`python -m pdserve.bench --compare`).
#
# On the GPU machine, from the repo root, with .whl/ and .deb/ carried (see
# ../shared/device/make-carry.sh; the install is skipped where Ray already imports):
#   OUT=$OUT bash bench/gpu_serving.sh
# Results: $OUT/log (everything printed) and $OUT/<workload>.tar.gz (per workload: the
# JSON reports with every request's record, the PNG plots and both cluster logs). The device
# brings back at most 8 files, hence the archives.
#
# Everything is overridable through the environment (a CPU dry run uses this: tiny configs,
# short workload): COLOCATED, DISAGG (the two configs), NUM_REQUESTS, WARMUP, PH_INPUT,
# PH_OUTPUT, PH_RATES, PH_SLO, DH_INPUT, DH_OUTPUT, DH_RATES, DH_SLO, BUDGET_S (the whole
# script's wall-clock budget), PH_BUDGET_S (the first comparison's share), START_TIMEOUT,
# CARRY (the folder holding .whl/ and .deb/), WORK (scratch folder for the reports), VOCAB
# (token ids LO:HI for the prompts; bench's default fits the 8B's vocabulary).
#
# Sizing (Llama-3.1-8B shape, H100/H200 figures from docs/benchmarks.md): a 2k-token
# prefill takes ~45-50 ms, a decode step ~6.5 ms at batch 1, ~8.3 ms at 32, ~13.5 ms at 128.
# - prefill-heavy (1.5-2k-token prompts, 16 output tokens): one prefill GPU saturates near
#   20-22 req/s, two colocated replicas near twice that (minus their decode steps), so rates
#   6, 12, 24 straddle the 1P1D knee. TTFT bound 200 ms = ~4 prefills; TPOT bound 20 ms =
#   ~3 decode steps: a colocated decode step that a 2k prefill joins takes ~50 ms.
# - decode-heavy (128-256-token prompts, 256 output tokens, ~2-3 s a request): one decode
#   GPU holds ~90 requests at 32 req/s (step ~11 ms), each colocated replica half of that
#   plus the prefills that join its steps. TPOT bound 15 ms (~2x the batch-1 step): the
#   figure that separates them; TTFT bound 300 ms (short prompts prefill in ~15-20 ms).
set -uo pipefail

T0=$SECONDS
OUT=${OUT:-bench/results/gpu-serving}
WORK=${WORK:-/tmp/pdserve-gpu-serving}
CARRY=${CARRY:-.}
COLOCATED=${COLOCATED:-configs/bench/gpu-8b-colocated.yaml}
DISAGG=${DISAGG:-configs/bench/gpu-8b-1p1d.yaml}
NUM_REQUESTS=${NUM_REQUESTS:-80}
WARMUP=${WARMUP:-4}
PH_INPUT=${PH_INPUT:-1536:2048}
PH_OUTPUT=${PH_OUTPUT:-16:16}
PH_RATES=${PH_RATES:-6,12,24}
PH_SLO=${PH_SLO:-ttft=200ms,tpot=20ms}
DH_INPUT=${DH_INPUT:-128:256}
DH_OUTPUT=${DH_OUTPUT:-256:256}
DH_RATES=${DH_RATES:-8,16,32}
DH_SLO=${DH_SLO:-ttft=300ms,tpot=15ms}
BUDGET_S=${BUDGET_S:-430}
PH_BUDGET_S=${PH_BUDGET_S:-210}
START_TIMEOUT=${START_TIMEOUT:-300}

mkdir -p "$OUT" "$WORK"
LOG=$OUT/log
say() { echo "[gpu_serving +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }

if ! python3 -c "import ray, redis, pydantic" 2>/dev/null; then
  say "installing the carry from $CARRY"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/.whl/*.whl \
    || { say "carry install failed"; exit 1; }
  export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
  for f in "$CARRY"/.deb/*.deb; do dpkg -x "$f" /tmp/deb; done
  export PATH=/tmp/deb/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/deb/usr/lib/x86_64-linux-gnu
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown)"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpus', torch.cuda.device_count(), 'ray', ray.__version__)"
  echo "configs: $COLOCATED vs $DISAGG"
} 2>&1 | tee -a "$LOG"

# compare NAME TIMEOUT_S INPUT OUTPUT RATES SLO
compare() {
  local name=$1 limit=$2 input=$3 output=$4 rates=$5 slo=$6
  local cmd=(python3 -m pdserve.bench --compare "$COLOCATED" "$DISAGG"
    --input-len "$input" --output-len "$output" --rates "$rates" --slo "$slo"
    --num-requests "$NUM_REQUESTS" --warmup "$WARMUP" --seed 0 --request-timeout 120
    --out-dir "$WORK/$name" --no-progress --cluster-start-timeout "$START_TIMEOUT"
    ${VOCAB:+--vocab "$VOCAB"})
  say "$name (limit ${limit}s): ${cmd[*]}"
  # SIGINT first: bench stops its cluster on the way out.
  timeout -s INT -k 45 "$limit" "${cmd[@]}" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name exit code $rc"
  tar czf "$OUT/$name.tar.gz" -C "$WORK" "$name" 2>&1 | tee -a "$LOG"
  return "$rc"
}

left() { echo $((BUDGET_S - (SECONDS - T0))); }

ph_limit=$(( $(left) - 120 < PH_BUDGET_S ? $(left) - 120 : PH_BUDGET_S ))
compare prefill_heavy "$ph_limit" "$PH_INPUT" "$PH_OUTPUT" "$PH_RATES" "$PH_SLO"
rc1=$?
compare decode_heavy "$(( $(left) - 15 ))" "$DH_INPUT" "$DH_OUTPUT" "$DH_RATES" "$DH_SLO"
rc2=$?
say "done: prefill_heavy rc=$rc1 decode_heavy rc=$rc2"
[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
