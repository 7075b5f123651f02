"""Tensor-parallel workers in a real cluster: each worker is a rank group of Ray actors (one
per rank, one placement group), rank 0 schedules and broadcasts each step over gloo, the
followers execute. Greedy tokens must equal HF transformers', a cancel must give every
block back, and a killed follower rank must fail its worker cleanly while the other
worker keeps serving.

One cluster, shared by the module's tests: a tiny HF Llama (4 query heads, 2 KV heads)
with two colocated TP=2 workers (the fault test needs a second worker to keep serving).
TP=3 on the real SmolLM2 and disaggregated pairs of different parallelism are in
test_cluster_reshard.py.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import ray
from cluster_checks import assert_blocks_back, free_blocks, running_cluster, worker_stats
from testkit import hf_greedy

pytestmark = pytest.mark.timeout(600)

NEW_TOKENS = 6
TIMEOUT_S = 10.0  # the rank groups' collective timeout


def _config(model: str, tp: int, count: int) -> dict:
    return {
        "model": {"name": model, "max_model_len": 256},
        "mode": "colocated",
        "kv": {"block_size": 8, "memory_mb": 4},
        "decode": {"count": count, "tp": tp, "num_cpus": 0.25,
                   "collective_timeout_s": TIMEOUT_S},
        "ray": {"num_cpus": 2},
    }


def _greedy(client, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    out = client.generate(ids, max_tokens=n, min_tokens=n, temperature=0)
    assert out["finish_reason"] == "length"
    return out["token_ids"]


@pytest.fixture(scope="module")
def tiny_tp2(tiny_model_factory):
    path, hf = tiny_model_factory("llama", seed=31)
    with running_cluster(_config(path, tp=2, count=2)) as (bg, client):
        yield bg, client, hf


def _group(bg, worker_id: str):
    return bg.cluster.worker_groups[worker_id]


def test_tp2_workers_are_rank_groups_with_hf_greedy(tiny_tp2):
    bg, client, hf = tiny_tp2
    infos = {i["worker_id"]: i for i in bg.cluster.ready_info}
    assert {w: i["parallel"] for w, i in infos.items()} == {
        "colocated-0": {"tp": 2, "pp": 1}, "colocated-1": {"tp": 2, "pp": 1}}
    for wid in infos:
        group = _group(bg, wid)
        assert len(group.followers) == 1
        # The follower joined, holds its own KV head (1 of 2) and the driver's pool size.
        h = ray.get(group.followers[0].health.remote(), timeout=30)
        assert h["rank"] == 1 and h["kv_heads"] == 1 and h["kv_blocks"] > 0
        assert h["pid"] != infos[wid]["pid"]
    for prompt in ([5, 17, 33], list(range(40, 61))):  # one block, across blocks
        for _ in range(2):  # two requests: the tie-break sends them to both workers
            assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
    steps = {w: ray.get(_group(bg, w).followers[0].health.remote())["steps"] for w in infos}
    assert all(n > 0 for n in steps.values()), f"a follower executed no step: {steps}"


def test_cancel_mid_decode_gives_blocks_back(tiny_tp2):
    bg, client, _ = tiny_tp2
    start = free_blocks(client)
    stream = client.stream(list(range(3, 30)), max_tokens=200, min_tokens=200, temperature=0)
    next(stream)
    next(stream)  # decoding now
    stream.close()  # cancels the call
    assert_blocks_back(client, start)


def test_killed_follower_fails_its_worker_cleanly_and_the_group_is_replaced(tiny_tp2):
    bg, client, hf = tiny_tp2
    stream = client.stream(list(range(3, 12)), max_tokens=200, min_tokens=200, temperature=0)
    next(stream)
    busy = [w for w, s in worker_stats(client).items() if s.running]
    assert len(busy) == 1, busy
    victim, other = busy[0], ({"colocated-0", "colocated-1"} - set(busy)).pop()
    follower = _group(bg, victim).followers[0]
    run_ref = _group(bg, victim).follower_runs[0]
    os.kill(ray.get(follower.health.remote())["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    waited = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert f"{victim} failed" in err.value.details() and "rank group" in err.value.details()
    assert waited < TIMEOUT_S + 5, f"the error took {waited:.1f}s"
    with pytest.raises(ray.exceptions.RayActorError):  # the killed rank is gone
        ray.get(run_ref, timeout=30)

    # The supervisor sees the broken group (its stats carry the rank failure): the worker
    # leaves routing and is replaced by a new group; new requests meanwhile go elsewhere.
    old_driver = _group(bg, victim).driver
    prompt = [7, 8, 9]
    for _ in range(3):
        assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
    deadline = time.monotonic() + 90
    while True:
        stats = worker_stats(client)
        s = stats[victim]
        if s.state == "up" and _group(bg, victim).driver is not old_driver \
                and not s.rank_failure and s.free_blocks == s.total_blocks > 0:
            break
        assert time.monotonic() < deadline, f"{victim} was not replaced: {s}"
        time.sleep(0.5)
    # Admin.Stats (what `pdserve stats` prints) shows each worker's layout and rank health.
    assert (stats[victim].tp, stats[victim].pp, stats[other].tp) == (2, 1, 2)
    assert stats[other].rank_failure == ""
    assert len(_group(bg, victim).followers) == 1
    for _ in range(3):  # served by both groups again
        assert _greedy(client, prompt) == hf_greedy(hf, prompt, NEW_TOKENS)
    assert_blocks_back(client, {w: stats[w].total_blocks for w in (victim, other)})
