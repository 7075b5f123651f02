"""KV-aware routing on synthetic cluster states: cached prefixes (own cache, node store)
against queues, priced at measured rates."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from pdserve.router.kv_aware_policy import CostModel, KVAwarePolicy, PrefixLocator

BS = 16


class Table(PrefixLocator):
    """A synthetic cluster: what each worker caches and each node's store holds, as prefix
    lengths in tokens."""

    def __init__(self, local: dict[str, int], store: dict[str, int]):
        self.local, self.store = local, store

    def local_tokens(self, worker_id, token_ids):
        return self.local.get(worker_id, 0)

    def store_tokens(self, node, token_ids, after):
        return max(0, self.store.get(node, 0) - after)


def workers(*ids):
    return [SimpleNamespace(worker_id=i) for i in ids]


def policy(local=None, store=None, nodes=None, **cost) -> KVAwarePolicy:
    nodes = nodes or {"p0": "n0", "p1": "n1"}
    return KVAwarePolicy(BS, Table(local or {}, store or {}), nodes,
                         CostModel(prefill_tokens_per_s=1000, load_bytes_per_s=1e9,
                                   kv_bytes_per_token=50_000, **cost))


PROMPT = list(range(1000))


def test_the_worker_holding_the_prefix_wins_when_both_are_idle():
    p = policy(local={"p1": 960})
    assert p.pick_prefill(workers("p0", "p1"), token_ids=PROMPT).worker_id == "p1"
    assert p.pending_tokens("p1") == 40  # only the uncached part queues


def test_a_long_queue_outweighs_a_cached_prefix():
    p = policy(local={"p1": 960})
    p._pending["p1"] = deque([3000])  # 3 s of prefill ahead
    assert p.pick_prefill(workers("p0", "p1"), token_ids=PROMPT).worker_id == "p0"


def test_store_hits_on_a_workers_node_count_at_the_load_bandwidth():
    p = policy(store={"n1": 960})
    ttft0, _, _ = p.plan("p0", PROMPT)
    ttft1, local, stored = p.plan("p1", PROMPT)
    assert (local, stored) == (0, 960)
    assert ttft0 == pytest.approx(1.0)  # 1000 tokens at 1000 tok/s
    assert ttft1 == pytest.approx(0.04 + 960 * 50_000 / 1e9)  # 40 computed + 48 MB loaded
    assert p.pick_prefill(workers("p0", "p1"), token_ids=PROMPT).worker_id == "p1"


def test_a_slow_measured_load_makes_recomputing_cheaper():
    p = policy(store={"n1": 960})
    for _ in range(50):  # loads measured at 10 MB/s: 960 tokens would take 4.8 s
        p.observe_load(10_000_000, 1.0)
    assert p.cost.load_bytes_per_s == pytest.approx(1e7, rel=0.01)
    assert p.pick_prefill(workers("p0", "p1"), token_ids=PROMPT).worker_id == "p0"


def test_own_cache_and_store_never_count_a_token_twice():
    p = policy(local={"p1": 480}, store={"n1": 960})
    _, local, stored = p.plan("p1", PROMPT)
    assert (local, stored) == (480, 480)
    full = policy(local={"p1": 1000}, store={"n1": 1000})
    _, local, stored = full.plan("p1", PROMPT)
    assert local + stored == 999  # the last token is always computed


def test_pending_tokens_return_to_zero_when_prefills_finish():
    p = policy()
    ws = workers("p0", "p1")
    picked = [p.pick_prefill(ws, token_ids=PROMPT) for _ in range(4)]
    for w in picked:
        p.on_prefill_started(w)
    assert sorted(w.worker_id for w in picked) == ["p0", "p0", "p1", "p1"]  # queues balance
    for w in picked:
        p.on_prefill_done(w)
    assert p.pending_tokens("p0") == p.pending_tokens("p1") == 0


def test_conditional_disaggregation_prefills_short_uncached_parts_on_decode():
    p = KVAwarePolicy(BS, Table({"d0": 960}, {}), {"d0": "n0"}, conditional_tokens=64)
    assert p.prefill_on_decode("d0", PROMPT)  # 40 tokens left to compute
    assert not p.prefill_on_decode("d0", list(range(2000)))


def test_without_token_ids_it_is_the_least_loaded_policy():
    p = policy(local={"p1": 960})
    p.in_flight.update(p0=0, p1=2)
    assert p.pick_prefill(workers("p0", "p1")).worker_id == "p0"


def test_rates_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        CostModel(prefill_tokens_per_s=0)
