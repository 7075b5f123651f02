"""Block manager and block hashing: counts, sharing, prefix cache, LRU eviction, hash chain."""

from __future__ import annotations

import pytest

from pdserve.engine.kv_cache.block_hash import ROOT_HASH, hash_block, hash_blocks
from pdserve.engine.kv_cache.block_manager import BlockManager, OutOfBlocksError

BS = 4
KEY = "compat-a"


def hashes(n: int, salt: int = 0) -> list[bytes]:
    """`n` distinct chained hashes (a prompt of `n` full blocks)."""
    return hash_blocks([salt * 1000 + i for i in range(n * BS)], BS, KEY)


# --- allocation, sharing, freeing ----------------------------------------------------------


def test_allocate_and_free_return_counts_to_start():
    bm = BlockManager(8, BS)
    assert bm.num_free_blocks == 8
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a) | set(b)) == 8  # all distinct
    assert bm.num_free_blocks == 0
    assert all(bm.ref_count(x) == 1 for x in a + b)
    bm.free(a)
    assert bm.num_free_blocks == 3
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert all(bm.ref_count(x) == 0 for x in range(8))


def test_share_keeps_block_until_last_reference_dropped():
    bm = BlockManager(4, BS)
    blocks = bm.allocate(2)
    bm.share(blocks)
    assert [bm.ref_count(b) for b in blocks] == [2, 2]
    bm.free(blocks)
    assert bm.num_free_blocks == 2  # still held by the second owner
    others = bm.allocate(2)
    assert set(others).isdisjoint(blocks)  # shared blocks are never handed out again
    bm.free(blocks)
    assert [bm.ref_count(b) for b in blocks] == [0, 0]
    bm.free(others)
    assert bm.num_free_blocks == 4


def test_share_of_unused_block_raises():
    bm = BlockManager(4, BS)
    with pytest.raises(ValueError, match="not in use"):
        bm.share([0])


def test_double_free_raises_and_changes_nothing():
    bm = BlockManager(4, BS)
    (b,) = bm.allocate(1)
    bm.free([b])
    with pytest.raises(ValueError, match="double free"):
        bm.free([b])
    assert bm.num_free_blocks == 4
    # The block was not put on the free list twice: four allocations give four ids.
    assert len(set(bm.allocate(4))) == 4
    with pytest.raises(OutOfBlocksError):
        bm.allocate(1)


def test_out_of_blocks_error_leaves_pool_untouched():
    bm = BlockManager(4, BS)
    held = bm.allocate(3)
    assert not bm.can_allocate(2)
    with pytest.raises(OutOfBlocksError, match="asked for 2 blocks, 1 free"):
        bm.allocate(2)
    assert bm.num_free_blocks == 1
    bm.free(held)
    assert bm.num_free_blocks == 4


# --- prefix cache --------------------------------------------------------------------------


def test_commit_then_match_prefix_takes_references():
    bm = BlockManager(8, BS)
    hs = hashes(3)
    blocks = bm.allocate(3)
    for b, h in zip(blocks, hs):
        bm.commit_hash(b, h)
    assert bm.num_cached_blocks == 3
    # A second request with the same first two blocks and a different third.
    other = hs[:2] + hashes(1, salt=7)
    matched = bm.match_prefix(other)
    assert matched == blocks[:2]
    assert [bm.ref_count(b) for b in blocks] == [2, 2, 1]
    bm.free(matched)
    bm.free(blocks)
    assert bm.num_free_blocks == 8


def test_match_prefix_stops_at_first_miss():
    bm = BlockManager(8, BS)
    hs = hashes(3)
    blocks = bm.allocate(3)
    bm.commit_hash(blocks[0], hs[0])
    bm.commit_hash(blocks[2], hs[2])  # block 1 never committed (its KV not written yet)
    matched = bm.match_prefix(hs)
    assert matched == blocks[:1]
    bm.free(matched)
    bm.free(blocks)
    assert bm.num_free_blocks == 8


def test_uncommitted_block_is_not_matchable():
    bm = BlockManager(4, BS)
    blocks = bm.allocate(2)
    assert bm.match_prefix(hashes(2)) == []
    bm.free(blocks)
    assert bm.num_cached_blocks == 0


def test_evictable_blocks_count_as_free_and_stay_matchable():
    bm = BlockManager(4, BS)
    hs = hashes(2)
    blocks = bm.allocate(2)
    for b, h in zip(blocks, hs):
        bm.commit_hash(b, h)
    bm.free(blocks)
    assert bm.num_free_blocks == 4  # evictable blocks are free for allocation purposes
    assert bm.num_cached_blocks == 2
    matched = bm.match_prefix(hs)  # revived from the evictable set
    assert matched == blocks
    assert bm.num_free_blocks == 2
    bm.free(matched)
    assert bm.num_free_blocks == 4


def test_allocation_reclaims_evictable_blocks_lru_first():
    bm = BlockManager(4, BS)
    old, new = hashes(1, salt=1), hashes(1, salt=2)
    (b_old,) = bm.allocate(1)
    (b_new,) = bm.allocate(1)
    bm.commit_hash(b_old, old[0])
    bm.commit_hash(b_new, new[0])
    bm.free([b_old])  # released first: least recently used
    bm.free([b_new])
    plain = bm.allocate(2)  # the two never-used blocks go first
    assert set(plain).isdisjoint({b_old, b_new})
    assert bm.num_cached_blocks == 2
    (reclaimed,) = bm.allocate(1)  # now one cached block must be evicted: the older one
    assert reclaimed == b_old
    assert bm.match_prefix(old) == []  # its contents are gone from the index
    assert bm.lookup(old[0]) is None
    assert bm.match_prefix(new) == [b_new]  # the newer one survives
    bm.free([b_new, reclaimed, *plain])
    assert bm.num_free_blocks == 4


def test_matched_block_becomes_most_recently_used():
    bm = BlockManager(2, BS)
    a, b = hashes(1, salt=1), hashes(1, salt=2)
    blocks = bm.allocate(2)
    bm.commit_hash(blocks[0], a[0])
    bm.commit_hash(blocks[1], b[0])
    bm.free(blocks)  # LRU order: a, b
    bm.free(bm.match_prefix(a))  # touching a makes b the least recently used
    (reclaimed,) = bm.allocate(1)
    assert reclaimed == blocks[1]
    assert bm.lookup(a[0]) == blocks[0]
    bm.free([reclaimed])
    assert bm.num_free_blocks == 2


def test_same_hash_committed_twice_keeps_first_block():
    bm = BlockManager(4, BS)
    (h,) = hashes(1)
    first, second = bm.allocate(2)
    bm.commit_hash(first, h)
    bm.commit_hash(second, h)  # a concurrent computation of the same prefix
    assert bm.lookup(h) == first
    assert bm.num_cached_blocks == 1
    bm.free([second])  # the duplicate is private: freeing it does not touch the index
    assert bm.lookup(h) == first
    assert bm.match_prefix([h]) == [first]
    bm.free([first, first])
    assert bm.num_free_blocks == 4
    assert bm.lookup(h) == first


def test_reset_prefix_cache_drops_only_unreferenced_blocks():
    bm = BlockManager(4, BS)
    hs = hashes(2)
    blocks = bm.allocate(2)
    for b, x in zip(blocks, hs):
        bm.commit_hash(b, x)
    bm.free(blocks[:1])  # block 0 evictable, block 1 still in use
    assert bm.reset_prefix_cache() == 1
    assert bm.lookup(hs[0]) is None
    assert bm.lookup(hs[1]) == blocks[1]
    assert bm.num_free_blocks == 3
    bm.free(blocks[1:])
    assert bm.reset_prefix_cache() == 1
    assert bm.num_cached_blocks == 0
    assert bm.num_free_blocks == 4


def test_prefix_caching_disabled_never_matches():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    hs = hashes(1)
    blocks = bm.allocate(1)
    bm.commit_hash(blocks[0], hs[0])
    assert bm.match_prefix(hs) == []
    bm.free(blocks)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 0


# --- block hashes --------------------------------------------------------------------------


def test_same_prefix_gives_same_hashes():
    a = hash_blocks(list(range(12)), BS, KEY)
    b = hash_blocks(list(range(12)) + [99, 98], BS, KEY)
    assert len(a) == 3
    assert b == a  # the extra partial block is not hashed
    assert len(set(a)) == 3


def test_hashes_are_chained():
    ids = list(range(16))
    base = hash_blocks(ids, BS, KEY)
    changed = hash_blocks([ids[0] + 1, *ids[1:]], BS, KEY)  # first token differs
    assert all(x != y for x, y in zip(base, changed))  # every later block's hash changes
    late = list(ids)
    late[9] = 500  # a token in block 2
    late_h = hash_blocks(late, BS, KEY)
    assert late_h[:2] == base[:2] and late_h[2] != base[2] and late_h[3] != base[3]
    # The chain is hash(parent, tokens, key), starting from the root.
    assert base[0] == hash_block(ROOT_HASH, ids[:4], KEY)
    assert base[1] == hash_block(base[0], ids[4:8], KEY)


def test_same_tokens_after_different_parent_hash_differently():
    block = [1, 2, 3, 4]
    assert hash_blocks(block * 2, BS, KEY)[1] != hash_blocks(block, BS, KEY)[0]


def test_compat_key_changes_hashes():
    ids = list(range(8))
    a = hash_blocks(ids, BS, "model-a")
    b = hash_blocks(ids, BS, "model-b")
    assert a[0] != b[0] and a[1] != b[1]


def test_only_full_blocks_are_hashed():
    assert hash_blocks([1, 2, 3], BS, KEY) == []
    assert len(hash_blocks(list(range(7)), BS, KEY)) == 1
    assert len(hash_blocks(list(range(8)), BS, KEY)) == 2
    assert hash_blocks([], BS, KEY) == []


def test_hashes_are_stable_bytes():
    # Fixed-width digests, independent of Python's per-process hash randomisation.
    (h,) = hash_blocks([5, 6, 7, 8], BS, KEY)
    assert isinstance(h, bytes) and len(h) == 16
    assert h == hash_block(ROOT_HASH, (5, 6, 7, 8), KEY)


# --- contiguous allocation (fewer NCCL runs per KV transfer) -------------------------------


def _runs(ids: list[int]) -> int:
    return 1 + sum(b != a + 1 for a, b in zip(ids, ids[1:]))


def test_allocate_contiguous_prefers_one_run_and_keeps_the_counts():
    bm = BlockManager(16, BS)
    assert bm.allocate_contiguous(4) == [0, 1, 2, 3]  # fresh pool: the next ids on the list
    scattered = bm.allocate(8)  # 4..11
    bm.free(scattered[1::2])  # free 5, 7, 9, 11: holes of one block
    got = bm.allocate_contiguous(3)
    assert _runs(got) == 1 and got == [11, 12, 13]  # the one run that fits, not the holes
    assert all(bm.ref_count(b) == 1 for b in got)
    assert bm.num_free_blocks == 16 - 4 - 4 - 3
    bm.free([0, 1, 2, 3, *scattered[::2], *got])
    assert bm.num_free_blocks == 16 and all(bm.ref_count(b) == 0 for b in range(16))
    assert sorted(bm.allocate(16)) == list(range(16))  # every id exactly once


def test_allocate_contiguous_falls_back_to_the_fewest_runs_then_to_eviction():
    bm = BlockManager(10, BS)
    held = bm.allocate(10)
    bm.free([0, 1, 2, 5, 6, 8])  # runs of 3, 2, 1
    got = bm.allocate_contiguous(5)
    assert sorted(got) == [0, 1, 2, 5, 6] and _runs(got) == 2  # longest runs first
    assert bm.num_free_blocks == 1
    # fewer plain-free blocks than asked: the normal path, evicting cached blocks
    bm.commit_hash(3, hashes(1)[0])
    bm.free([3])
    assert sorted(bm.allocate_contiguous(2)) == [3, 8]
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        bm.allocate_contiguous(1)
    bm.free([b for b in held if b not in (0, 1, 2, 5, 6, 8, 3)] + got + [3, 8])
    assert bm.num_free_blocks == 10
