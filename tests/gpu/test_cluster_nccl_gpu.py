"""A real 1P1D cluster on two GPUs, KV over NCCL, against a colocated one: same tokens.

Ray is started by our launcher (BackgroundCluster), one worker per GPU, with a
random-weight model of a real shape (no weights can be downloaded on the GPU machine).
The same greedy token-id prompts go to the disaggregated cluster and then to a colocated
cluster on one GPU, one at a time (so batch composition is the same), twice (the second
round is timed); the tokens must be identical. Time to first token of both is written to
$PDSERVE_GPU_OUT/cluster_nccl_<preset>.json when that variable is set (a figure for
docs/benchmarks.md, not a timed assertion). PDSERVE_GPU_CLUSTER_MODEL picks the model.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]
ray = pytest.importorskip("ray")

MODEL = os.environ.get("PDSERVE_GPU_CLUSTER_MODEL", "random:smollm2-135m")
PROMPT_LENS = (5, 17, 300, 2048)
NEW_TOKENS = 16
POOL = {"num_gpus": 1, "num_cpus": 1, "device": "cuda", "threads": 2,
        "max_num_batched_tokens": 4096}


def _config(mode: str) -> dict:
    cfg = {
        "model": {"name": MODEL, "dtype": "bfloat16", "max_model_len": 4096},
        "mode": mode,
        # No prefix caching: a cached prefix takes another (bf16-inexact) prefill path, and
        # with random weights near-tied logits then flip greedy tokens between rounds.
        "kv": {"block_size": 16, "memory_mb": 2048, "enable_prefix_caching": False},
        "decode": {"count": 1, **POOL, "max_num_seqs": 16},
        "router": {"port": 0, "http_port": 0, "max_tokens_limit": 256},
    }
    if mode == "disaggregated":
        cfg.update(transport="nccl", prefill={"count": 1, **POOL})
    return cfg


def _serve(mode: str, prompts: list[list[int]]) -> tuple[list[list[int]], list[float]]:
    from pdserve.cluster.background import BackgroundCluster
    from pdserve.cluster.client import PdserveClient
    from pdserve.cluster.config import parse_config

    rounds = []
    with BackgroundCluster(parse_config(_config(mode))) as bg, \
            PdserveClient(bg.address, timeout=120) as client:
        for _ in range(2):  # the first round pays Triton compiles and warm-up; not timed
            tokens, ttft = [], []
            for ids in prompts:
                t0, first, got = time.perf_counter(), None, []
                for r in client.stream(ids, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                                        temperature=0):
                    if first is None and r.token_ids:
                        first = time.perf_counter() - t0
                    got.extend(r.token_ids)
                tokens.append(got)
                ttft.append(first)
            rounds.append((tokens, ttft))
    assert rounds[0][0] == rounds[1][0], f"{mode}: greedy output changed between rounds"
    return rounds[1]


def test_1p1d_over_nccl_gives_the_colocated_tokens():
    rng = random.Random(0)
    prompts = [[rng.randrange(256, 40000) for _ in range(n)] for n in PROMPT_LENS]
    disagg, ttft_d = _serve("disaggregated", prompts)
    coloc, ttft_c = _serve("colocated", prompts)
    out = os.environ.get("PDSERVE_GPU_OUT")
    if out:
        name = f"cluster_nccl_{MODEL.removeprefix('random:')}.json"
        with open(os.path.join(out, name), "w") as f:
            json.dump({"model": MODEL, "device": torch.cuda.get_device_name(0),
                       "prompt_tokens": list(PROMPT_LENS), "ttft_1p1d_s": ttft_d,
                       "ttft_colocated_s": ttft_c, "tokens_equal": disagg == coloc}, f, indent=2)
    print("TTFT 1P1D", ttft_d, "colocated", ttft_c)
    for n, d, c in zip(PROMPT_LENS, disagg, coloc):
        assert len(d) == NEW_TOKENS and d == c, f"{n}-token prompt: 1P1D {d} vs colocated {c}"
