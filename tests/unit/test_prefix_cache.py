"""The prefix cache seam: `stored` / `evicted` events a subscriber (the global store, the
router's index) can rebuild this worker's cached hashes from, and the lock invariant."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.kv_cache.block_hash import hash_blocks
from pdserve.engine.kv_cache.block_manager import BlockManager, OutOfBlocksError
from pdserve.engine.kv_cache.prefix_cache import CacheEvent, CacheEventKind, LRUPrefixCache

BS = 4


def hashes(n: int, base: int = 0) -> list:
    return hash_blocks(list(range(base, base + n * BS)), BS, "test-key")


class Recorder:
    """A subscriber that mirrors the cache's content from events alone."""

    def __init__(self, bm: BlockManager) -> None:
        self.events: list[CacheEvent] = []
        self.held: set = set()
        self.bm = bm
        self.unsubscribe = bm.prefix_cache.subscribe(self)

    def __call__(self, event: CacheEvent) -> None:
        self.events.append(event)
        for h in event.block_hashes:
            if event.kind is CacheEventKind.STORED:
                assert h not in self.held, "stored twice without an eviction between"
                self.held.add(h)
            else:
                assert h in self.held, "evicted a hash that was never stored"
                self.held.remove(h)
                # Reported before the slot is reused: nobody holds a reference yet, and the
                # hash no longer finds a block.
                assert self.bm.lookup(h) is None

    def kinds(self) -> list[tuple[str, int]]:
        return [(e.kind.value, len(e.block_hashes)) for e in self.events]


def cache_blocks(bm: BlockManager, hs: list) -> list[int]:
    """Allocate, 'write' and publish one block per hash, then free them (evictable)."""
    ids = bm.allocate(len(hs))
    for b, h in zip(ids, hs):
        bm.commit_hash(b, h)
    bm.free(reversed(ids))
    return ids


def test_commit_emits_stored_once_per_hash_and_duplicates_stay_private():
    bm = BlockManager(8, BS)
    rec = Recorder(bm)
    hs = hashes(2)
    a = bm.allocate(2)
    bm.commit_hash(a[0], hs[0])
    bm.commit_hash(a[1], hs[1])
    bm.commit_hash(a[1], hs[1])  # idempotent
    b = bm.allocate(1)
    bm.commit_hash(b[0], hs[0])  # same content elsewhere: the first block stays canonical
    assert rec.kinds() == [("stored", 1), ("stored", 1)]
    assert rec.held == set(hs)
    assert bm.lookup(hs[0]) == a[0]
    bm.free(b)
    assert bm.num_cached_blocks == 2  # the private copy went to the free list, not the cache


def test_reuse_of_an_evictable_block_is_reported_before_the_id_is_returned():
    bm = BlockManager(4, BS)
    rec = Recorder(bm)
    hs = hashes(4)
    cache_blocks(bm, hs)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4
    got = bm.allocate(3)  # no free blocks left: three cached ones are evicted, LRU first
    assert rec.kinds() == [("stored", 1)] * 4 + [("evicted", 1)] * 3
    # Freed tail first, so the prefix keeps its first block longest.
    assert [e.block_hashes[0] for e in rec.events[4:]] == [hs[3], hs[2], hs[1]]
    assert rec.held == {hs[0]}
    assert bm.match_prefix(hs) == [bm.lookup(hs[0])]
    assert all(bm.ref_count(b) == 1 for b in got)


def test_a_locked_block_is_never_evicted():
    bm = BlockManager(4, BS)
    rec = Recorder(bm)
    hs = hashes(2)
    cache_blocks(bm, hs)
    in_use = bm.match_prefix(hs)  # a request took both cached blocks: locked
    assert bm.num_free_blocks == 2
    with pytest.raises(OutOfBlocksError):
        bm.allocate(3)
    other = bm.allocate(2)
    assert not set(other) & set(in_use)
    assert bm.reset_prefix_cache() == 0  # nothing evictable
    assert [e.kind for e in rec.events] == [CacheEventKind.STORED] * 2
    bm.free(reversed(in_use))  # unlocked: evictable again, still findable
    assert bm.match_prefix(hs) == in_use
    bm.free(reversed(in_use))
    bm.free(other)
    assert bm.num_free_blocks == bm.num_blocks


def test_reset_evicts_every_unlocked_block_in_one_event():
    bm = BlockManager(8, BS)
    rec = Recorder(bm)
    cache_blocks(bm, hashes(3))
    keep = bm.allocate(1)
    bm.commit_hash(keep[0], hashes(1, base=500)[0])
    assert bm.reset_prefix_cache() == 3
    assert rec.kinds()[-1] == ("evicted", 3)
    assert rec.held == {hashes(1, base=500)[0]}
    assert bm.num_free_blocks == 7 and bm.num_cached_blocks == 1


def test_unsubscribe_and_caching_off():
    bm = BlockManager(4, BS)
    rec = Recorder(bm)
    rec.unsubscribe()
    cache_blocks(bm, hashes(2))
    assert rec.events == []
    off = BlockManager(4, BS, enable_prefix_caching=False)
    rec_off = Recorder(off)
    cache_blocks(off, hashes(2))
    assert rec_off.events == [] and off.num_cached_blocks == 0
    assert off.match_prefix(hashes(2)) == []


def test_hit_and_free_counts_match_the_cache_under_random_use():
    """Random allocate / share / publish / match / free: a subscriber that only sees events
    always knows exactly the cached hashes, and every block comes back."""
    rng = random.Random(0)
    bm = BlockManager(16, BS)
    rec = Recorder(bm)
    prefixes = [hashes(4, base=1000 * i) for i in range(6)]
    live: list[list[int]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.45 and bm.num_free_blocks >= 4:
            hs = rng.choice(prefixes)
            ids = bm.match_prefix(hs)
            ids += bm.allocate(len(hs) - len(ids))
            for b, h in zip(ids, hs):
                bm.commit_hash(b, h)
            live.append(ids)
        elif op < 0.55 and live:
            ids = rng.choice(live)
            bm.share(ids)
            live.append(list(ids))
        elif op < 0.6:
            bm.reset_prefix_cache()
        elif live:
            bm.free(reversed(live.pop(rng.randrange(len(live)))))
        cached = {h for p in prefixes for h in p if bm.lookup(h) is not None}
        assert rec.held == cached
        assert bm.num_cached_blocks == len(cached)
    for ids in live:
        bm.free(reversed(ids))
    assert bm.num_free_blocks == bm.num_blocks


def test_lru_cache_alone_keeps_its_invariants():
    cache = LRUPrefixCache()
    hs = hashes(3)
    for b, h in enumerate(hs):
        assert cache.insert(b, h)
    assert not cache.insert(9, hs[0]) and not cache.insert(0, hs[1])
    assert cache.match(hs) == [0, 1, 2] and cache.num_evictable == 0
    assert cache.evict() is None  # all locked
    assert cache.unlock(1) and cache.unlock(0) and not cache.unlock(7)
    cache.lock(1)
    assert cache.evict() == 0 and cache.evict() is None
    assert cache.match(hs) == []  # the prefix is broken at block 0
    assert cache.lookup(hs[1]) == 1
