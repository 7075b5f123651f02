"""Disaggregated pairs whose prefill worker is split into pipeline stages, in a real
cluster (real Ray, gloo, gRPC, models): every stage's rank pushes the layers it
holds straight to the decode rank(s) holding those heads — no gather at rank 0 — and a
decode rank's reservation completes only once every stage's layers arrived. Tokens equal
HF transformers' greedy ones.

- prefill PP=2 (4 layers: 2 + 2) -> decode TP=2 (2 KV heads: one a rank): each of the two
  stages sends each decode rank its head of its layers (four streams a request);
- prefill PP=2 over 3 layers (2 + 1, uneven) -> decode TP=1. (The same pair with the real
  SmolLM2-135M, 15 + 15 layers, also gives HF's tokens, but costs seven times as long.)
- prefill TP=2 -> decode PP=2 over 3 layers: each prefill rank sends each decode stage its
  head of that stage's layers only (`KVSink.rank_layers`).

A cancel mid-prefill and mid-decode gives every block back on every rank.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from cluster_checks import assert_blocks_back, free_blocks, running_cluster
from testkit import hf_greedy

pytestmark = pytest.mark.timeout(600)

NEW_TOKENS = 5


def _config(model: str, d_tp: int, p_tp: int = 1, p_pp: int = 2, d_pp: int = 1) -> dict:
    return {
        "model": {"name": model, "max_model_len": 512},
        "mode": "disaggregated",
        "kv": {"block_size": 8, "memory_mb": 4},
        "prefill": {"count": 1, "tp": p_tp, "pp": p_pp, "num_cpus": 0.25,
                    "collective_timeout_s": 20},
        "decode": {"count": 1, "tp": d_tp, "pp": d_pp, "num_cpus": 0.25,
                   "collective_timeout_s": 20},
        "ray": {"num_cpus": 2},
    }


def _greedy(client, ids: list[int]) -> list[int]:
    out = client.generate(ids, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0)
    assert out["finish_reason"] == "length"
    return out["token_ids"]


def _handoffs(client) -> int:
    return sum(w.handoffs for w in client.stats().workers)


def _health(bg, worker_id: str) -> list[dict]:
    return [ray.get(f.health.remote(), timeout=30)
            for f in bg.cluster.worker_groups[worker_id].followers]


def _check_pair(bg, client, hf, layers_per_stage: list[int], d_tp: int,
                prompts: list[list[int]]) -> None:
    info = {i["worker_id"]: i for i in bg.cluster.ready_info}
    assert info["prefill-0"]["parallel"] == {"tp": 1, "pp": 2}
    assert info["prefill-0"]["layout_key"]["layers_per_stage"] == layers_per_stage
    assert info["decode-0"]["parallel"] == {"tp": d_tp, "pp": 1}
    (stage1,) = _health(bg, "prefill-0")
    assert stage1["kv_layers"] == layers_per_stage[1]  # it holds (and sends) only its own
    before = _handoffs(client)
    for prompt in prompts:
        assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
    assert _handoffs(client) == before + 2, "the prompts must have gone P -> D"
    assert _health(bg, "prefill-0")[0]["steps"] > 0


@pytest.fixture(scope="module")
def p_pp2_d_tp2(tiny_model_factory):
    path, hf = tiny_model_factory("llama", seed=61, num_hidden_layers=4)
    with running_cluster(_config(path, d_tp=2)) as (bg, client):
        yield bg, client, hf


def test_prefill_pp2_to_decode_tp2_equals_hf(p_pp2_d_tp2):
    bg, client, hf = p_pp2_d_tp2
    prompts = [[3 + i for i in range(13)], list(range(40, 77))]  # 2 and 5 blocks
    _check_pair(bg, client, hf, [2, 2], d_tp=2, prompts=prompts)
    assert [h["kv_heads"] for h in _health(bg, "decode-0")] == [1]
    # Prompts prefilled in one step go through the stages as micro-batches: each stage
    # saves a layer once the last micro-batch wrote it, for every prompt of the step.
    prompts = [[3 + i, 60 + 2 * i, 9, 100 - i, 7, 8, 9, 10, 11 + i] for i in range(4)]
    before = _handoffs(client)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: _greedy(client, p), prompts))
    assert outs == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert _handoffs(client) == before + 4


def test_cancel_mid_prefill_and_mid_decode_gives_blocks_back_on_every_rank(p_pp2_d_tp2):
    bg, client, _ = p_pp2_d_tp2
    start = free_blocks(client)
    long_prompt = list(range(3, 200))
    stream = client.stream(long_prompt, max_tokens=100, min_tokens=100, temperature=0)
    stream.close()  # cancelled at once: mid-reserve or mid-prefill
    stream = client.stream(long_prompt, max_tokens=100, min_tokens=100, temperature=0)
    next(stream)
    next(stream)  # decoding on D
    stream.close()
    assert_blocks_back(client, start)
    assert [h["kv_reservations"] for h in _health(bg, "decode-0")] == [0]


def test_prefill_pp2_uneven_stages_to_decode_tp1_equals_hf(tiny_model_factory):
    path, hf = tiny_model_factory("llama", seed=62, num_hidden_layers=3)
    with running_cluster(_config(path, d_tp=1)) as (bg, client):
        _check_pair(bg, client, hf, [2, 1], d_tp=1,
                    prompts=[[5, 17, 33], list(range(40, 77))])  # 1 and 5 blocks


def test_prefill_tp2_to_decode_pp2_equals_hf_and_cancels_clean(tiny_model_factory):
    path, hf = tiny_model_factory("llama", seed=63, num_hidden_layers=3)
    with running_cluster(_config(path, d_tp=1, p_tp=2, p_pp=1, d_pp=2)) as (bg, client):
        info = {i["worker_id"]: i for i in bg.cluster.ready_info}
        assert info["decode-0"]["layout_key"]["layers_per_stage"] == [2, 1]
        (stage1,) = _health(bg, "decode-0")
        assert stage1["kv_layers"] == 1
        start = free_blocks(client)
        before = _handoffs(client)
        for prompt in ([5, 17, 33], list(range(40, 77))):
            assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
        assert _handoffs(client) == before + 2
        stream = client.stream(list(range(3, 200)), max_tokens=100, min_tokens=100,
                               temperature=0)
        next(stream)
        stream.close()  # mid-decode
        assert_blocks_back(client, start)
        assert [h["kv_reservations"] for h in _health(bg, "decode-0")] == [0]
