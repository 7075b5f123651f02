"""The router's routing policy: load spreads over equal workers, free blocks decide D."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from pdserve.messages import WorkerStats
from pdserve.router.policy import RoutingPolicy


def workers(*ids):
    return [SimpleNamespace(worker_id=i) for i in ids]


def stats(worker_id: str, free_blocks: int) -> WorkerStats:
    return WorkerStats(worker_id, "decode", free_blocks, total_blocks=64, running=0, waiting=0,
                       prompt_tokens=0, generated_tokens=0)


def test_equal_prefill_and_decode_workers_share_requests_evenly():
    """Each request picks a P then a D; ties must still alternate on both pools."""
    policy = RoutingPolicy(block_size=16)
    prefill, decode = workers("p0", "p1"), workers("d0", "d1")
    picks_p, picks_d = Counter(), Counter()
    for _ in range(10):
        picks_p[policy.pick_prefill(prefill).worker_id] += 1
        picks_d[policy.pick_decode(decode, 32).worker_id] += 1
    assert picks_p == {"p0": 5, "p1": 5}
    assert picks_d == {"d0": 5, "d1": 5}


def test_prefill_with_fewer_requests_in_flight_wins():
    policy = RoutingPolicy(block_size=16)
    prefill = workers("p0", "p1")
    policy.in_flight.update(p0=3, p1=1)
    assert all(policy.pick_prefill(prefill).worker_id == "p1" for _ in range(4))


def test_decode_with_most_free_blocks_wins_and_reservations_count_against_it():
    policy = RoutingPolicy(block_size=16)
    decode = workers("d0", "d1")
    policy.update_stats([stats("d0", free_blocks=10), stats("d1", free_blocks=12)])
    first = policy.pick_decode(decode, 64)
    assert first.worker_id == "d1"
    policy.on_reserved(first, 64)  # 4 blocks: d1 now has 8 in the router's estimate
    assert policy.pick_decode(decode, 64).worker_id == "d0"


def test_excluded_workers_are_avoided_while_others_remain():
    policy = RoutingPolicy(block_size=16)
    prefill = workers("p0", "p1")
    assert all(policy.pick_prefill(prefill, exclude={"p0"}).worker_id == "p1"
               for _ in range(3))
    # With every worker excluded the pool is used anyway rather than failing.
    assert policy.pick_prefill(prefill, exclude={"p0", "p1"}).worker_id in ("p0", "p1")


def test_prefills_in_flight_are_counted_by_the_policy_from_pick_to_return():
    policy = RoutingPolicy(block_size=16)
    p0, p1 = prefill = workers("p0", "p1")
    policy.on_prefill_started(p0)
    policy.on_prefill_started(p0)
    policy.on_prefill_started(p1)
    assert policy.pick_prefill(prefill).worker_id == "p1"
    policy.on_prefill_done(p0)
    policy.on_prefill_done(p0)
    assert policy.in_flight == {"p0": 0, "p1": 1}
    assert policy.pick_prefill(prefill).worker_id == "p0"
    policy.on_prefill_done(p1)
    with pytest.raises(RuntimeError, match="without a matching start"):
        policy.on_prefill_done(p1)
    assert policy.in_flight == {"p0": 0, "p1": 0}


def test_a_local_request_goes_to_the_worker_running_the_fewest_then_most_free_blocks():
    """Colocated picks count the router's own live requests: polled free blocks lag, and
    two requests a moment apart must not both land on one worker while another is idle."""
    policy = RoutingPolicy(block_size=16)
    c0, c1 = cs = workers("c0", "c1")
    policy.update_stats([stats("c0", free_blocks=40), stats("c1", free_blocks=40)])
    first = policy.pick_local(cs, 64)
    policy.on_local_started(first)
    second = policy.pick_local(cs, 64)  # same stats (not polled since): the other worker
    assert second is not first
    policy.on_local_started(second)
    policy.update_stats([stats("c0", free_blocks=30), stats("c1", free_blocks=36)])
    assert policy.pick_local(cs, 64) is c1  # one each: the most free blocks
    policy.on_local_started(c1)
    assert policy.pick_local(cs, 64) is c0  # c1 runs two
    # A worker without room for the prompt is passed over while another has it.
    policy.update_stats([stats("c0", free_blocks=3), stats("c1", free_blocks=36)])
    assert policy.pick_local(cs, 64) is c1
    for d in (first, second, c1):
        policy.on_local_done(d)
    assert policy.local == {"c0": 0, "c1": 0}
    with pytest.raises(RuntimeError, match="without a matching start"):
        policy.on_local_done(c0)
