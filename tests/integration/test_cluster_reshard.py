"""Disaggregated pairs of different tensor parallelism in a real cluster (real Ray, gloo,
gRPC, models): every prefill rank pushes the KV heads it holds straight to the decode
rank(s) holding them — no rank gathers — and the tokens equal HF transformers' greedy ones.

- a tiny HF Llama (4 query heads, 2 KV heads): prefill TP=2 -> decode TP=1; and one of
  1 KV head, replicated on both prefill ranks, prefill TP=2 -> decode TP=1;
- the real SmolLM2-135M (9 query heads, 3 KV heads): prefill TP=1 -> decode TP=3, and
  short prompts prefilled on the TP=3 decode worker itself (conditional disaggregation),
  i.e. a colocated TP=3 worker.

Cancels mid-prefill and mid-decode must give every block back on every rank: the drivers'
block managers (Admin.Stats) and each follower rank's receiver reservations.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import ray
from cluster_checks import assert_blocks_back, free_blocks, running_cluster
from testkit import hf_greedy

pytestmark = pytest.mark.timeout(600)

NEW_TOKENS = 5
TIMEOUT_S = 20  # the rank groups' collective timeout
SHORT = 8  # prompts this short are prefilled on the decode worker


def _config(model: str, p_tp: int, d_tp: int) -> dict:
    return {
        "model": {"name": model, "max_model_len": 512},
        "mode": "disaggregated",
        "kv": {"block_size": 8, "memory_mb": 8},
        "prefill": {"count": 1, "tp": p_tp, "num_cpus": 0.25,
                    "collective_timeout_s": TIMEOUT_S},
        "decode": {"count": 1, "tp": d_tp, "num_cpus": 0.25, "collective_timeout_s": TIMEOUT_S},
        "router": {"conditional_prefill_tokens": SHORT},
        "ray": {"num_cpus": 2},
    }


def _greedy(client, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    out = client.generate(ids, max_tokens=n, min_tokens=n, temperature=0)
    assert out["finish_reason"] == "length"
    return out["token_ids"]


def _follower_reservations(bg) -> list[int]:
    return [ray.get(f.health.remote(), timeout=30)["kv_reservations"]
            for g in bg.cluster.worker_groups.values() for f in g.followers]


def _handoffs(client) -> int:
    return sum(w.handoffs for w in client.stats().workers)


@pytest.fixture(scope="module")
def tiny_p2_d1(tiny_model_factory):
    path, hf = tiny_model_factory("llama", seed=41)
    with running_cluster(_config(path, p_tp=2, d_tp=1)) as (bg, client):
        yield bg, client, hf, path


def test_prefill_tp2_to_decode_tp1_equals_hf(tiny_p2_d1):
    bg, client, hf, path = tiny_p2_d1
    parallel = {i["worker_id"]: i["parallel"]["tp"] for i in bg.cluster.ready_info}
    assert parallel == {"prefill-0": 2, "decode-0": 1}
    before = _handoffs(client)
    for prompt in ([3 + i for i in range(13)], list(range(40, 77))):  # 2 and 5 blocks
        assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
    assert _handoffs(client) == before + 2, "the prompts must have gone P -> D"
    (follower,) = bg.cluster.worker_groups["prefill-0"].followers
    assert ray.get(follower.health.remote())["kv_heads"] == 1  # P rank 1 sent its own head
    from pdserve.engine import LLM

    _seeded_equal_offline(client, LLM(path, block_size=8, num_blocks=64), list(range(3, 30)))


def test_prefill_tp2_over_one_replicated_kv_head_to_decode_tp1_equals_hf(
        tiny_model_factory):
    # 1 KV head at TP 2: both prefill ranks hold it (rank_groups hands the follower the
    # model's head count); only rank 0 pushes it, rank 1's sender has no route.
    path, hf = tiny_model_factory("llama", seed=43, num_key_value_heads=1)
    with running_cluster(_config(path, p_tp=2, d_tp=1)) as (bg, client):
        start = free_blocks(client)
        for prompt in ([3 + i for i in range(13)], list(range(40, 77))):  # 2 and 5 blocks
            assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
        assert _handoffs(client) == 2, "the prompts must have gone P -> D"
        (follower,) = bg.cluster.worker_groups["prefill-0"].followers
        assert ray.get(follower.health.remote(), timeout=30)["kv_heads"] == 1
        assert_blocks_back(client, start)


def test_cancel_mid_prefill_and_mid_decode_gives_blocks_back_on_every_rank(tiny_p2_d1):
    bg, client, _, _ = tiny_p2_d1
    start = free_blocks(client)
    long_prompt = list(range(3, 200))
    stream = client.stream(long_prompt, max_tokens=100, min_tokens=100, temperature=0)
    stream.close()  # the call is cancelled at once: mid-reserve or mid-prefill
    stream = client.stream(long_prompt, max_tokens=100, min_tokens=100, temperature=0)
    next(stream)
    next(stream)  # decoding on D
    stream.close()
    assert_blocks_back(client, start)
    assert _follower_reservations(bg) == [0]


def test_killed_prefill_follower_fails_the_handoff_clearly_then_is_replaced(tiny_p2_d1):
    # Last test on this cluster: it breaks the prefill worker's rank group.
    bg, client, hf, _ = tiny_p2_d1
    start = free_blocks(client)
    p_group = bg.cluster.worker_groups["prefill-0"]
    pid = ray.get(p_group.followers[0].health.remote(), timeout=30)["pid"]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    prompt = list(range(3, 40))
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompt, max_tokens=4, temperature=0)
    assert time.monotonic() - t0 < TIMEOUT_S + 10
    # The only prefill worker is broken (then down while the supervisor replaces it): a
    # clear UNAVAILABLE naming it, never a Ray traceback.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "prefill" in err.value.details() and "Traceback" not in err.value.details()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(p_group.follower_runs[0], timeout=30)
    # A new rank group takes its place and serves the same prompt right.
    deadline = time.monotonic() + 90
    while True:
        stats = {w.worker_id: w for w in client.stats().workers}
        s = stats["prefill-0"]
        if s.state == "up" and not s.rank_failure \
                and bg.cluster.worker_groups["prefill-0"] is not p_group:
            break
        assert time.monotonic() < deadline, f"prefill-0 was not replaced: {s}"
        time.sleep(0.5)
    assert stats["decode-0"].rank_failure == ""
    assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
    # Nothing leaked on the decode side, and the new prefill group holds nothing.
    assert_blocks_back(client, start)


@pytest.fixture(scope="module")
def smollm_p1_d3():
    with running_cluster(_config("smollm2-135m-instruct", p_tp=1, d_tp=3)) as (bg, client):
        yield bg, client


def _seeded_equal_offline(client, llm, prompt: list[int]) -> None:
    """Seeded sampling keyed by (seed, position): a layout's tokens equal a one-rank
    offline engine's for the same seeds (the first token sampled on P, the rest on D)."""
    from pdserve.engine import SamplingParams

    params = {"temperature": 1.5, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS}
    seeds = (7, 1234, 2**40 + 3)
    want = llm.generate([prompt] * len(seeds), [SamplingParams(seed=s, **params) for s in seeds])
    for seed, offline in zip(seeds, want):
        assert client.generate(prompt, seed=seed, **params)["token_ids"] == offline.token_ids
    assert len({tuple(o.token_ids) for o in want}) > 1  # the seeds really sample


def test_smollm2_prefill_tp1_to_decode_tp3_and_colocated_tp3_equal_hf(smollm_p1_d3, hf_model,
                                                                       llm):
    bg, client = smollm_p1_d3
    d_group = bg.cluster.worker_groups["decode-0"]
    heads = [ray.get(f.health.remote(), timeout=30)["kv_heads"] for f in d_group.followers]
    assert heads == [1, 1]  # 3 KV heads, one a rank
    start = free_blocks(client)
    handed = _handoffs(client)
    short = [1, 9690, 198, 2683, 359, 253]  # prefilled on the TP=3 decode worker
    assert _greedy(client, short) == hf_greedy(hf_model, short, NEW_TOKENS)
    assert _handoffs(client) == handed
    long = [1, 9690, 198, 2683, 359, 253, 5356, 30, 1350, 314, 260, 3575, 282, 4649, 47, 2]
    assert _greedy(client, long) == hf_greedy(hf_model, long, NEW_TOKENS)
    assert _handoffs(client) == handed + 1  # P TP=1 pushed to all three D ranks
    # (Not after the end-of-turn token: what follows it is near-certain for any seed.)
    _seeded_equal_offline(client, llm, long[:-2])  # P TP=1 -> D TP=3
    _seeded_equal_offline(client, llm, short)  # colocated on the TP=3 worker
    stream = client.stream(long * 4, max_tokens=50, min_tokens=50, temperature=0)
    next(stream)
    stream.close()
    time.sleep(0.2)
    assert_blocks_back(client, start)
    assert _follower_reservations(bg) == [0, 0]
