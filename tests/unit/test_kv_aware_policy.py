"""KV-aware routing on synthetic cluster states: cached prefixes (own cache, node store)
against queues, priced at measured rates; and the locator the router runs, against a real
redis-server holding a real store pool's index."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import SimpleNamespace

import pytest

from pdserve.engine.kv_cache.block_hash import hash_blocks
from pdserve.kv_store.index import StoreIndex
from pdserve.messages import WorkerStats
from pdserve.router.kv_aware_policy import CostModel, KVAwarePolicy
from pdserve.router.policy import NoWorkerUp
from pdserve.router.prefix_locator import (
    PrefixLocator,
    PrefixMap,
    RoutedPrefixLocator,
    prompt_block_hashes,
)

BS = 16
KEY = "content-key-digest"
PROMPT = list(range(1000))
NBLK = (len(PROMPT) - 1) // BS  # 62 full blocks a cache may cover


def where(local=None, store=None, n=1000) -> PrefixMap:
    """A synthetic answer: leading cached tokens per worker / per node."""
    nblk = (n - 1) // BS

    def bits(tokens: int) -> tuple[bool, ...]:
        return tuple(i < tokens // BS for i in range(nblk))

    return PrefixMap(n, BS, tuple(hash_blocks(PROMPT[:nblk * BS], BS, KEY)),
                     {w: bits(t) for w, t in (local or {}).items()},
                     {node: bits(t) for node, t in (store or {}).items()})


class Fixed(PrefixLocator):
    """A synthetic cluster state: always the same answer; remembers what was routed."""

    def __init__(self, answer: PrefixMap | None = None):
        super().__init__(BS)
        self.answer = answer
        self.routed_to: list[str] = []

    async def locate(self, num_tokens, hashes, workers, nodes):
        return self.answer

    def routed(self, worker_id, hashes):
        self.routed_to.append(worker_id)


def workers(*ids):
    return [SimpleNamespace(worker_id=i) for i in ids]


def policy(nodes=None, locator=None, **cost) -> KVAwarePolicy:
    nodes = nodes or {"p0": "n0", "p1": "n1"}
    return KVAwarePolicy(BS, locator or Fixed(), nodes, KEY,
                         CostModel(prefill_tokens_per_s=1000, load_bytes_per_s=1e9,
                                   kv_bytes_per_token=50_000, **cost))


def stats(wid, role="prefill", **kw) -> WorkerStats:
    base = dict(free_blocks=100, total_blocks=100, running=0, waiting=0, prompt_tokens=0,
                generated_tokens=0)
    return WorkerStats(wid, role, **{**base, **kw})


def test_the_worker_holding_the_prefix_wins_when_both_are_idle():
    p = policy()
    assert p.pick_prefill(workers("p0", "p1"), where=where({"p1": 960})).worker_id == "p1"
    assert p.pending_tokens("p1") == 40  # only the uncached part queues
    assert p.locator.routed_to == ["p1"]  # the prompt is now held there


def test_a_long_queue_outweighs_a_cached_prefix():
    p = policy()
    p._pending["p1"] = deque([3000])  # 3 s of prefill ahead
    assert p.pick_prefill(workers("p0", "p1"), where=where({"p1": 960})).worker_id == "p0"


def test_store_hits_on_a_workers_node_count_at_the_load_bandwidth():
    p = policy()
    w = where(store={"n1": 960})
    ttft0, _, _ = p.plan("p0", w)
    ttft1, local, stored = p.plan("p1", w)
    assert (local, stored) == (0, 960)
    assert ttft0 == pytest.approx(1.0)  # 1000 tokens at 1000 tok/s
    assert ttft1 == pytest.approx(0.04 + 960 * 50_000 / 1e9)  # 40 computed + 48 MB loaded
    assert p.pick_prefill(workers("p0", "p1"), where=w).worker_id == "p1"


def test_a_slow_measured_load_makes_recomputing_cheaper():
    p = policy()
    for _ in range(50):  # loads measured at 10 MB/s: 960 tokens would take 4.8 s
        p.observe_load(10_000_000, 1.0)
    assert p.cost.load_bytes_per_s == pytest.approx(1e7, rel=0.01)
    assert p.pick_prefill(workers("p0", "p1"), where=where(store={"n1": 960})).worker_id \
        == "p0"


def test_own_cache_and_store_never_count_a_token_twice():
    p = policy()
    _, local, stored = p.plan("p1", where({"p1": 480}, {"n1": 960}))
    assert (local, stored) == (480, 480)
    _, local, stored = p.plan("p1", where({"p1": 992}, {"n1": 992}))
    assert (local, stored) == (992, 0)
    assert local + stored <= len(PROMPT) - 1  # the last token is always computed


def test_the_store_counts_only_a_run_that_starts_where_the_own_cache_ends():
    w = where()
    bits = [True] * 5 + [False] * 5 + [True] * (NBLK - 10)  # blocks 5..9 evicted
    w = PrefixMap(w.num_tokens, BS, w.hashes, w.local, {"n1": tuple(bits)})
    assert w.store_tokens("n1", 0) == 80
    assert w.store_tokens("n1", 64) == 16  # block 10 on is useless without 5..9
    assert w.store_tokens("n1", 160) == (NBLK - 10) * BS  # ... unless the worker has them
    assert w.store_tokens("n1", 7) == 0  # not a block boundary: nothing to load
    assert w.store_tokens(None, 0) == 0


def test_pending_tokens_return_to_zero_when_prefills_finish():
    p = policy()
    ws = workers("p0", "p1")
    picked = [p.pick_prefill(ws, where=where()) for _ in range(4)]
    for w in picked:
        p.on_prefill_started(w)
    assert sorted(w.worker_id for w in picked) == ["p0", "p0", "p1", "p1"]  # queues balance
    for w in picked:
        p.on_prefill_done(w)
    assert p.pending_tokens("p0") == p.pending_tokens("p1") == 0


def test_a_down_worker_is_never_picked_however_much_it_holds():
    p = policy()
    p.mark_down("p1")
    w = where({"p1": 992})
    assert all(p.pick_prefill(workers("p0", "p1"), where=w).worker_id == "p0"
               for _ in range(3))
    p.mark_down("p0")
    with pytest.raises(NoWorkerUp):
        p.pick_prefill(workers("p0", "p1"), where=w)


def test_conditional_disaggregation_counts_the_decode_workers_cached_part():
    p = policy(nodes={"d0": "n0", "d1": "n0"})
    ds = workers("d0", "d1")
    assert p.prefill_on_decode(ds, 1000, where({"d1": 960}), threshold=64)  # 40 to compute
    assert p.prefill_on_decode(ds, 1000, where(store={"n0": 944}), threshold=64)  # 56
    assert not p.prefill_on_decode(ds, 1000, where({"d1": 480}), threshold=64)
    assert not p.prefill_on_decode(ds, 1000, where({"d1": 960}), threshold=0)  # off
    p.mark_down("d1")
    assert not p.prefill_on_decode(ds, 1000, where({"d1": 960}), threshold=64)
    # Without a map it is the plain rule: the whole prompt against the threshold.
    assert p.prefill_on_decode(ds, 50, None, threshold=64)


def test_a_local_run_goes_where_the_prefix_is_unless_that_worker_has_no_room():
    p = policy(nodes={"c0": "n0", "c1": "n0"})
    cs = workers("c0", "c1")
    p.update_stats([stats("c0", "colocated"), stats("c1", "colocated")])
    assert p.pick_local(cs, 1000, where({"c1": 960})).worker_id == "c1"
    p.update_stats([stats("c0", "colocated"), stats("c1", "colocated", free_blocks=10)])
    assert p.pick_local(cs, 1000, where({"c1": 960})).worker_id == "c0"  # 63 blocks needed
    # Without a map: the most free blocks, as the least-loaded policy does.
    assert p.pick_local(cs, 1000).worker_id == "c0"


def test_the_decode_worker_holding_the_prefix_wins_unless_it_is_much_fuller():
    p = policy(nodes={"d0": "n0", "d1": "n0"})
    ds = workers("d0", "d1")
    w = where({"d1": 960})  # d1 holds 60 of the prompt's 63 blocks: it receives 3
    p.update_stats([stats("d0", "decode", free_blocks=100),
                    stats("d1", "decode", free_blocks=90)])
    assert p.pick_decode(ds, 1000, where=w).worker_id == "d1"
    assert p.pick_decode(ds, 1000).worker_id == "d0"  # without a map: the most free blocks
    # 60 blocks of prefix weigh as 60 free blocks: d0 with 61 more room wins again.
    p.update_stats([stats("d0", "decode", free_blocks=151),
                    stats("d1", "decode", free_blocks=90)])
    assert p.pick_decode(ds, 1000, where=w).worker_id == "d0"
    # Room for what it must receive is required; with none anywhere, the least full is used.
    p.update_stats([stats("d0", "decode", free_blocks=100),
                    stats("d1", "decode", free_blocks=2)])
    assert p.pick_decode(ds, 1000, where=w).worker_id == "d0"
    p.update_stats([stats("d0", "decode", free_blocks=1), stats("d1", "decode", free_blocks=2)])
    assert p.pick_decode(ds, 1000, where=w).worker_id == "d1"


def test_decode_picks_keep_the_base_rules_down_excluded_and_ties():
    p = policy(nodes={"d0": "n0", "d1": "n0"})
    ds = workers("d0", "d1")
    p.update_stats([stats("d0", "decode"), stats("d1", "decode")])
    w = where({"d0": 960, "d1": 960})
    assert sorted(p.pick_decode(ds, 1000, where=w).worker_id for _ in range(4)) == [
        "d0", "d0", "d1", "d1"]  # equal: round robin
    assert p.pick_decode(ds, 1000, exclude={"d1"}, where=where({"d1": 960})).worker_id == "d0"
    p.mark_down("d0")
    assert p.pick_decode(ds, 1000, where=where({"d0": 960})).worker_id == "d1"


def test_without_a_map_it_is_the_least_loaded_policy():
    p = policy()
    p.in_flight.update(p0=0, p1=2)
    assert p.pick_prefill(workers("p0", "p1")).worker_id == "p0"


def test_polled_stats_move_the_prefill_rate_and_the_workers_nodes():
    p = policy()
    p.update_stats([stats("p0", running=1, prompt_tokens=0)], now=0.0)
    for i in range(1, 40):
        p.update_stats([stats("p0", running=1, prompt_tokens=5000 * i, node="n9")], now=i)
    assert p.cost.prefill_tokens_per_s == pytest.approx(5000, rel=0.01)
    assert p.nodes["p0"] == "n9"  # a replacement on another node
    idle = p.cost.prefill_tokens_per_s
    p.update_stats([stats("p0", prompt_tokens=10**6)], now=41)
    p.update_stats([stats("p0", prompt_tokens=10**6)], now=42)
    assert p.cost.prefill_tokens_per_s == idle  # an idle worker says nothing of its rate


def test_polled_store_loads_move_the_load_bandwidth_and_the_choice():
    p = policy()  # configured: 1 GB/s
    w = where(store={"n1": 960})  # 960 tokens (48 MB) in p1's node's pool
    assert p.pick_prefill(workers("p0", "p1"), where=w).worker_id == "p1"
    p._pending.clear()  # that prefill is done
    p.update_stats([stats("p1", store_loaded_bytes=0, store_load_seconds=0.0)], now=0.0)
    for i in range(1, 60):  # the worker's loads run at 10 MB/s (checks and copies)
        p.update_stats([stats("p1", store_loaded_bytes=20_000_000 * i,
                              store_load_seconds=2.0 * i)], now=float(i))
    assert p.cost.load_bytes_per_s == pytest.approx(1e7, rel=0.01)
    # 48 MB now take 4.8 s to load: recomputing all 1000 tokens (1 s) is cheaper.
    assert p.pick_prefill(workers("p0", "p1"), where=w).worker_id == "p0"
    p._pending.clear()
    slow = p.cost.load_bytes_per_s
    p.update_stats([stats("p1", store_loaded_bytes=0, store_load_seconds=0.0)], now=41)
    p.update_stats([stats("p1", store_loaded_bytes=0, store_load_seconds=0.0)], now=42)
    assert p.cost.load_bytes_per_s == slow  # a restarted worker's counters: no sample
    for i in range(1, 60):  # faster loads again: back to the store
        p.update_stats([stats("p1", store_loaded_bytes=10**10 * i,
                              store_load_seconds=1.0 * i)], now=42.0 + i)
    assert p.cost.load_bytes_per_s == pytest.approx(1e10, rel=0.01)
    assert p.pick_prefill(workers("p0", "p1"), where=w).worker_id == "p1"


def test_rates_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        CostModel(prefill_tokens_per_s=0)


# ---- the router's locator ---------------------------------------------------------------


def test_prompt_hashes_are_the_engines_prefix_hashes():
    from pdserve.engine.scheduler import Scheduler

    for n in (15, 16, 17, 33, 1000):
        want = Scheduler.prefix_hashes(SimpleNamespace(block_size=BS, compat_key=KEY),
                                       PROMPT[:n])
        assert prompt_block_hashes(PROMPT[:n], BS, KEY) == want


def test_routed_prompts_are_held_until_the_workers_pool_would_have_evicted_them():
    loc = RoutedPrefixLocator(BS, None)
    p = policy(nodes={"p0": "n0", "p1": "n0"}, locator=loc)
    ws = workers("p0", "p1")
    w = asyncio.run(p.locate(PROMPT))
    assert w.local_tokens("p0") == w.local_tokens("p1") == 0 and w.store == {}
    first = p.pick_prefill(ws, where=w)
    p.on_prefill_started(first)
    p.on_prefill_done(first)  # prefilled: its queue is empty again
    w = asyncio.run(p.locate(PROMPT + [7, 8, 9]))  # the same prefix, a longer prompt
    assert w.local_tokens(first.worker_id) == NBLK * BS
    assert p.pick_prefill(ws, where=w) is first  # back where it is cached
    p.mark_up(first.worker_id)  # replaced: the new process holds nothing
    assert asyncio.run(p.locate(PROMPT)).local_tokens(first.worker_id) == 0
    # A pool of 10 blocks keeps only the last 10 blocks routed to it.
    loc.set_capacity("p0", 10)
    loc.routed("p0", prompt_block_hashes(PROMPT, BS, KEY))
    assert asyncio.run(p.locate(PROMPT)).local_tokens("p0") == 0  # its head was evicted


def _commands(index: StoreIndex) -> int:
    return int(index._redis.info("stats")["total_commands_processed"])


def test_the_store_part_is_read_from_the_index_in_one_round_trip(redis_server, tmp_path):
    from pdserve.kv_store.node_store import NodeStore

    index = StoreIndex(redis_server.url)
    store = NodeStore(index, "n-route", num_slots=200, block_shape=(1, 2, BS, 1, 2),
                      dtype="float32", shm_dir=str(tmp_path),
                      lease_s=60.0)  # no heartbeat during the count
    loc = RoutedPrefixLocator(BS, redis_server.url)
    try:
        hashes = prompt_block_hashes(PROMPT, BS, KEY)
        _, refs = index.alloc("n-route", hashes[:40])
        assert index.commit("n-route", refs) == 40

        async def locate(hs):
            before = _commands(index)
            got = await loc.locate(len(PROMPT), hs, ["p0"], ["n-route", "n-nostore"])
            return got, _commands(index) - before - 1  # less the INFO call itself

        async def both():
            try:
                await locate(hashes)  # connects (AUTH)
                return await locate(hashes), await locate(hashes[:2])
            finally:
                await loc.close()

        (got, used), (_, used_short) = asyncio.run(both())
        assert got.store_tokens("n-route", 0) == 40 * BS
        assert got.store_tokens("n-route", 20 * BS) == 20 * BS
        assert got.store_tokens("n-nostore", 0) == 0  # no pool registered on that node
        assert used == used_short == 4  # two per node, whatever the prompt's length
    finally:
        store.close()
        index.close()


def test_an_unreachable_index_answers_nothing_at_once():
    loc = RoutedPrefixLocator(BS, "redis://127.0.0.1:1/0", timeout_s=0.2)
    hashes = prompt_block_hashes(PROMPT, BS, KEY)

    async def twice():
        a = await loc.locate(len(PROMPT), hashes, ["p0"], ["n0"])
        t = time.monotonic()
        b = await loc.locate(len(PROMPT), hashes, ["p0"], ["n0"])
        await loc.close()
        return a, b, time.monotonic() - t

    a, b, second = asyncio.run(twice())
    assert a.store == b.store == {}
    assert loc.errors == 1 and second < 0.05  # off for retry_s: no second attempt
