"""A prefill follower rank's failed KV push fails the handoff at once (real Ray, gloo, gRPC,
a tiny HF Llama; prefill TP=2 -> decode TP=2, one KV head a rank).

The prefill worker's follower rank sends its first push to a loopback port nobody listens
on (`debug.misroute_rank_pushes`): its part fails at connect, and the decode rank that
should receive it never hears of it. The driver rank collects its followers' outcomes, so
the client gets a clear error within seconds — not after the decode side's lease — the
reservation is aborted on every decode rank, and the next request is served right.
"""

from __future__ import annotations

import time

import grpc
import pytest
import ray
from cluster_checks import assert_blocks_back, free_blocks, running_cluster
from testkit import hf_greedy

pytestmark = pytest.mark.timeout(300)

NEW_TOKENS = 4
LEASE_S = 20.0  # what the decode side would otherwise wait for


def test_failed_follower_push_fails_the_request_fast_and_frees_every_rank(tiny_model_factory):
    path, hf = tiny_model_factory("llama", seed=47)
    config = {
        "model": {"name": path, "max_model_len": 256},
        "mode": "disaggregated",
        "kv": {"block_size": 8, "memory_mb": 4},
        "prefill": {"count": 1, "tp": 2, "num_cpus": 0.25, "collective_timeout_s": 20},
        "decode": {"count": 1, "tp": 2, "num_cpus": 0.25, "collective_timeout_s": 20},
        "router": {"handoff_retries": 0, "lease_seconds": LEASE_S},
        "debug": {"misroute_rank_pushes": 1},
        "ray": {"num_cpus": 2},
    }
    with running_cluster(config) as (bg, client):
        start = free_blocks(client)
        (d_rank,) = bg.cluster.worker_groups["decode-0"].followers
        (p_rank,) = bg.cluster.worker_groups["prefill-0"].followers
        prompt = list(range(3, 40))
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt, max_tokens=NEW_TOKENS, temperature=0)
        elapsed = time.monotonic() - t0
        assert elapsed < LEASE_S / 2, f"the failure took {elapsed:.1f}s to reach the client"
        print(f"failed follower push reached the client in {elapsed:.2f}s")
        details = err.value.details()
        assert "KV push of prefill rank 1 failed" in details and "Traceback" not in details
        assert_blocks_back(client, start)
        assert ray.get(d_rank.health.remote(), timeout=30)["kv_reservations"] == 0
        assert ray.get(p_rank.health.remote(), timeout=30)["steps"] > 0
        # The groups are whole: the next push goes where it should.
        out = client.generate(prompt, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                              temperature=0)
        assert out["token_ids"] == hf_greedy(hf, prompt, NEW_TOKENS)
        stats = {w.worker_id: w for w in client.stats().workers}
        assert stats["prefill-0"].handoffs == 1 and not stats["prefill-0"].rank_failure
        assert_blocks_back(client, start)
        assert ray.get(d_rank.health.remote(), timeout=30)["kv_reservations"] == 0
