"""Pipeline parallelism in a real cluster: a colocated worker whose layers are split into
two stages (Ray actors of one placement group; hidden states go stage to stage over gloo
send/recv, the logits come back to the driver) gives HF transformers' greedy tokens, for
prompts that fit one step, prompts whose prefill is chunked through the stages, and
concurrent requests, whose steps go through the stages as two micro-batches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from cluster_checks import assert_blocks_back, free_blocks, running_cluster
from testkit import hf_greedy

pytestmark = pytest.mark.timeout(600)

NEW_TOKENS = 6


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2-tp2"])
def test_pipeline_stages_equal_hf(tiny_model_factory, tp):
    # 4 layers: two a stage; 4 query heads and 2 KV heads: one KV head a TP rank.
    path, hf = tiny_model_factory("llama", seed=51, num_hidden_layers=4)
    config = {
        "model": {"name": path, "max_model_len": 256},
        "mode": "colocated",
        "kv": {"block_size": 8, "memory_mb": 4},
        "decode": {"count": 1, "tp": tp, "pp": 2, "num_cpus": 0.25,
                   "max_num_batched_tokens": 16, "collective_timeout_s": 20},
        "ray": {"num_cpus": 2},
    }
    with running_cluster(config) as (bg, client):
        (group,) = bg.cluster.worker_groups.values()
        assert len(group.followers) == 2 * tp - 1
        info = bg.cluster.ready_info[0]
        assert info["parallel"] == {"tp": tp, "pp": 2}
        assert info["layout_key"]["layers_per_stage"] == [2, 2]
        start = free_blocks(client)
        for prompt in ([5, 17, 33], list(range(40, 80))):  # one step; chunked (budget 16)
            out = client.generate(prompt, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                                  temperature=0)
            assert out["token_ids"] == hf_greedy(hf, prompt, NEW_TOKENS)
        # Batched: each step of several sequences is split into two micro-batches in flight.
        prompts = [[3 + i, 60 + 2 * i, 9, 100 - i] for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda p: client.generate(
                p, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0), prompts))
        for p, out in zip(prompts, outs):
            assert out["token_ids"] == hf_greedy(hf, p, NEW_TOKENS)
        steps = [ray.get(f.health.remote(), timeout=30)["steps"] for f in group.followers]
        assert min(steps) > 0
        assert client.stats().workers[0].pp == 2
        assert_blocks_back(client, start)
