"""The KV store's index scripts and pool, against a real redis-server (no model): slots,
LRU eviction that never takes a pinned block, byte checks, a store that died, a Redis that
went away and came back, and content keys that keep blocks apart."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import FinishReason, Sequence
from pdserve.kv_store.connector import StoreConnector
from pdserve.kv_store.index import StoreIndex
from pdserve.kv_store.node_store import NodeStore
from pdserve.kv_store.pool import BlockPool

SHAPE = (2, 2, 4, 1, 8)  # [layers, K|V, block_size, kv_heads, head_dim]: tiny blocks


@pytest.fixture
def store(redis_server, tmp_path, request):
    index = StoreIndex(redis_server.url)
    node = f"node-{request.node.name[-24:]}"
    s = NodeStore(index, node, num_slots=4, block_shape=SHAPE, dtype="float32",
                  shm_dir=str(tmp_path), lease_s=1.0)
    yield s
    s.close()
    index.close()


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(v: float) -> torch.Tensor:
    return torch.full(SHAPE, v)


def put(index: StoreIndex, node: str, pool: BlockPool, items: dict[bytes, float],
        crc: bool = False) -> int:
    got = index.alloc(node, list(items))
    if got is None:
        return 0
    _, refs = got
    for r in refs:
        pool.write(r.slot, r.gen, r.block_hash, block(items[r.block_hash]), crc=crc)
    return index.commit(node, refs)


def test_put_pin_check_and_lru_eviction_spares_pinned_blocks(store):
    index, node, pool = store.index, store.node, store.pool
    assert put(index, node, pool, {h(i): float(i) for i in range(4)}) == 4
    assert put(index, node, pool, {h(0): 0.0}) == 0  # already there: no slot taken
    _, refs = index.pin(node, [h(0), h(1), h(9), h(2)], 10_000)
    assert [r.block_hash for r in refs] == [h(0), h(1)]  # the prefix stops at the miss
    assert all(pool.check(r.slot, r.gen, r.block_hash) for r in refs)
    out = torch.empty(SHAPE)
    pool.read_into(refs[1].slot, out)
    assert torch.equal(out, block(1.0))
    # The pool is full: new blocks evict in LRU order, skipping the two pinned ones (h0, h1
    # were also touched last). h2 and h3 go; nothing else can.
    assert put(index, node, pool, {h(10): 10.0, h(11): 11.0, h(12): 12.0}) == 2
    assert index.pin(node, [h(2)], 10_000)[1] == []
    assert index.pin(node, [h(3)], 10_000)[1] == []
    for r in refs:  # the pinned blocks kept their bytes
        assert pool.check(r.slot, r.gen, r.block_hash)
    stats = index.pool_stats(node)
    assert (stats.capacity_blocks, stats.used_blocks, stats.pinned_blocks) == (4, 4, 2)
    assert stats.evictions == 2 and stats.puts == 6
    index.unpin(node, refs)
    assert index.pool_stats(node).pinned_blocks == 0
    assert put(index, node, pool, {h(12): 12.0}) == 1  # now an unpinned slot is evicted


def test_bytes_that_do_not_match_their_index_entry_are_a_miss(store):
    index, node, pool = store.index, store.node, store.pool
    put(index, node, pool, {h(1): 1.0, h(2): 2.0}, crc=True)
    _, refs = index.pin(node, [h(1), h(2)], 10_000)
    pool.blocks[refs[1].slot].view(-1)[0] += 1.0  # corrupt one value in place
    assert pool.check(refs[0].slot, refs[0].gen, h(1), crc=True)
    assert not pool.check(refs[1].slot, refs[1].gen, h(2), crc=True)
    assert pool.check(refs[1].slot, refs[1].gen, h(2))  # the header check trusts the bytes
    assert not pool.check(refs[0].slot, refs[0].gen + 1, h(1))  # another write's generation
    assert not pool.check(refs[0].slot, refs[0].gen, h(2))
    index.unpin(node, refs)


def test_a_prefix_check_stops_at_the_first_slot_whose_header_or_bytes_are_wrong(store):
    index, node, pool = store.index, store.node, store.pool
    put(index, node, pool, {h(i): float(i) for i in range(4)}, crc=True)
    _, refs = index.pin(node, [h(i) for i in range(4)], 10_000)
    want = [(r.slot, r.gen, r.block_hash) for r in refs]
    assert pool.check_prefix(want, crc=True) == 4  # CRCs checked in parallel
    assert pool.check_prefix(want[:1]) == 1 and pool.check_prefix([]) == 0
    assert pool.check_prefix([*want[:2], (want[2][0], want[2][1] + 1, h(2)), want[3]]) == 2
    assert pool.check_prefix([*want[:1], (99, 1, h(1))]) == 1  # a slot out of range
    pool.blocks[refs[1].slot].view(-1)[-1] += 1.0  # the last byte of the second slot
    assert pool.check_prefix(want, crc=True) == 1
    assert pool.check_prefix(want) == 4
    if not torch.cuda.is_available():
        assert not pool.pin_for_cuda() and not pool.pinned  # a no-op without CUDA
    index.unpin(node, refs)


def test_the_lease_is_refreshed_through_an_error_window(redis_server, tmp_path):
    """A Redis error turns the index off for retry_s, but the store's beat still refreshes
    the lease: a live pool must not lapse because some other call timed out once."""
    index = StoreIndex(redis_server.url, retry_s=30.0)
    s = NodeStore(index, "node-beat", 2, SHAPE, "float32", shm_dir=str(tmp_path), lease_s=0.4)
    put(index, "node-beat", s.pool, {h(1): 1.0})
    index._down_until = time.monotonic() + 30.0  # as after a timeout: every gated call off
    assert not index.available and index.pin("node-beat", [h(1)], 1000) is None
    time.sleep(1.0)  # 2.5 leases: only the beat kept it
    index._down_until = 0.0
    assert len(index.pin("node-beat", [h(1)], 1000)[1]) == 1
    s.close()
    index.close()


def test_a_dead_store_process_makes_its_pool_a_miss(redis_server, tmp_path):
    index = StoreIndex(redis_server.url)
    s = NodeStore(index, "node-dead", 2, SHAPE, "float32", shm_dir=str(tmp_path), lease_s=0.4)
    put(index, "node-dead", s.pool, {h(1): 1.0})
    assert len(index.pin("node-dead", [h(1)], 1000)[1]) == 1
    s._stop.set()  # the process stops beating (as if killed), its entries still in Redis
    s._thread.join()
    time.sleep(0.6)
    assert index.pin("node-dead", [h(1)], 1000) is None
    assert index.alloc("node-dead", [h(2)]) is None
    s.close()
    index.close()


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=1), seed=0, token_ids=list(tokens))


def finish_and_save(conn: StoreConnector, s: Sequence, num_blocks: int, key: str) -> None:
    """Mark `s`'s first `num_blocks` blocks computed (as the scheduler would) and end it."""
    from pdserve.engine.kv_cache.block_hash import hash_blocks

    s.block_ids = list(range(num_blocks))
    s.block_hashes = hash_blocks(s.token_ids[: num_blocks * SHAPE[2]], SHAPE[2], key)
    s.finish_reason = FinishReason.LENGTH
    assert conn.request_finished(s) is False  # kept until saved
    deadline = time.monotonic() + 5
    while s.request_id not in conn.finished_transfers():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def connector(store, key: str) -> tuple[StoreConnector, torch.Tensor]:
    kv = torch.zeros(SHAPE[0], 2, 8, *SHAPE[2:])  # 8 blocks, the engine's pool layout
    conn = StoreConnector(StoreIndex(store.index.url, retry_s=0.2), store.node)
    conn.register_kv_cache(kv, key)
    return conn, kv


def test_workers_share_blocks_only_under_the_same_content_key(store):
    tokens = list(range(100, 113))  # 3 full blocks of 4 + 1 token
    a, kv_a = connector(store, "content-A")
    kv_a.normal_()
    finish_and_save(a, seq("a", tokens), 3, "content-A")
    b_same, kv_same = connector(store, "content-A")
    b_other, _ = connector(store, "content-B")
    assert b_other.num_external_tokens(seq("x", tokens), 0) == 0
    s = seq("y", tokens)
    assert b_same.num_external_tokens(s, 0) == 12
    from pdserve.engine.kv_connector import LoadSpec, StepTransfers

    b_same.start_step(StepTransfers(load=(LoadSpec("y", (5, 6, 7, 0), 0, 12),)))
    assert torch.equal(kv_same[:, :, 5:8], kv_a[:, :, 0:3])
    assert b_same.counters.hit_blocks == 3
    assert store.index.pool_stats(store.node).pinned_blocks == 0
    for c in (a, b_same, b_other):
        c.close()


def test_redis_gone_means_misses_and_back_means_hits(redis_server, tmp_path):
    index = StoreIndex(redis_server.url, retry_s=0.2)
    s = NodeStore(index, "node-r", 4, SHAPE, "float32", shm_dir=str(tmp_path), lease_s=0.4)
    tokens = list(range(9))
    a, _ = connector(s, "k")
    finish_and_save(a, seq("a", tokens), 2, "k")
    b, _ = connector(s, "k")
    assert b.num_external_tokens(seq("b1", tokens), 0) == 8
    b.request_finished(seq("b1", tokens))  # unpins
    redis_server.kill()
    assert b.num_external_tokens(seq("b2", tokens), 0) == 0  # off, at once
    s2 = seq("a2", tokens)
    s2.block_ids, s2.finish_reason = [0, 1], FinishReason.LENGTH
    assert a.request_finished(s2) is True  # nothing to save while Redis is off
    redis_server.start()
    time.sleep(0.6)  # past every retry_s: the store re-registers its pool in the empty Redis
    assert b.num_external_tokens(seq("b3", tokens), 0) == 0  # a fresh Redis knows nothing
    finish_and_save(a, seq("a3", tokens), 2, "k")
    assert b.num_external_tokens(seq("b4", tokens), 0) == 8  # hits are back
    b.request_finished(seq("b4", tokens))
    for c in (a, b):
        c.close()
    s.close()
    index.close()
