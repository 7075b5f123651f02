#!/usr/bin/env bash
# Decode step of one worker through the in-process executor against a one-rank group
# (MultiprocExecutor, what a cluster worker with tp/pp runs), and against an older tree's
# in-process executor, alternated so drift hits every variant alike. GPU machine, repo root:
#   OLD=.old_tree OUT=$OUT bash bench/micro/executor_ab.sh
# OLD (optional): a checkout of the commit to compare with (`git archive REV | tar -x -C DIR`).
# Results: $OUT/executor_ab/<variant>-<round>.json and the printed tables.
set -uo pipefail
out=$(realpath -m "${OUT:-.}/executor_ab")
mkdir -p "$out"
args=(--sections fused_decode --batches "${BATCHES:-1,32,128}" --skip-hf)
here=$PWD
for round in $(seq 1 "${ROUNDS:-2}"); do
    if [ -n "${OLD:-}" ]; then
        (cd "$OLD" && PYTHONPATH=$PWD:${EXTRA_PATH:-} python3 -m pdserve.bench.micro.gpu_engine \
            "${args[@]}" --out "$out/old-$round.json") 2>&1 | tail -12
    fi
    for ex in uniproc rank-group; do
        PYTHONPATH=$here:${EXTRA_PATH:-} python3 -m pdserve.bench.micro.gpu_engine "${args[@]}" \
            --executor "$ex" --out "$out/$ex-$round.json" 2>&1 | tail -12
    done
done
