"""Block accounting for the paged KV pool: allocation, sharing, freeing, prefix caching.

The manager owns block *ids* only; the tensor they index lives in `KVLayout.allocate`.
Which blocks are findable by hash, and which of those may be evicted, is the prefix
cache's business (engine/kv_cache/prefix_cache.py); the manager keeps reference counts and
the free list, and locks a cached block while it has references.

Invariants:
- every block id is in exactly one of: referenced (ref count > 0), the free list, or the
  prefix cache's evictable set (ref count 0, contents still valid and findable by hash);
- `num_free_blocks` counts free + evictable, because an evictable block is reclaimed on
  demand; so after every sequence is freed, `num_free_blocks == num_blocks`;
- a block is findable by hash only after `commit_hash` — i.e. after its KV was written —
  so no reader can match a block whose contents are still being computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pdserve.engine.kv_cache.block_hash import BlockHash
from pdserve.engine.kv_cache.prefix_cache import LRUPrefixCache, PrefixCache


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockManager:
    """Reference-counted block pool with an optional hash-indexed prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 prefix_cache: PrefixCache | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # With caching off the cache stays empty: nothing is ever inserted into it.
        self.prefix_cache = prefix_cache or LRUPrefixCache()
        self._ref = [0] * num_blocks
        # Low ids first: keeps the used part of the pool dense, which helps locality.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self.prefix_cache.num_evictable

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash (in use or evictable)."""
        return self.prefix_cache.num_cached

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding `block_hash`, if cached (does not take a reference)."""
        return self.prefix_cache.lookup(block_hash)

    # ---- allocation ----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks with ref count 1, evicting cached blocks (LRU first) if needed."""
        if n > self.num_free_blocks:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            b = self._free.pop() if self._free else self.prefix_cache.evict()
            assert b is not None  # num_free_blocks counted it
            self._ref[b] = 1
            out.append(b)
        return out

    def allocate_contiguous(self, n: int) -> list[int]:
        """Like `allocate`, but best effort on consecutive ids (ascending), so a transfer
        into them is one region per layer instead of one per block.

        Takes the smallest run of free (never cached) ids that holds all `n`; failing that,
        the longest runs first, so the request still spans as few runs as possible. Falls
        back to `allocate` when fewer than `n` blocks are free without evicting cached ones.
        Costs O(free blocks) unless the next `n` ids on the free list are already a run.
        """
        if n <= 1 or n > len(self._free):
            return self.allocate(n)
        top = self._free[-n:]  # what `allocate` would pop next, last element first
        if top[0] - top[-1] == n - 1 and all(a == b + 1 for a, b in zip(top, top[1:])):
            del self._free[-n:]
            out = top[::-1]
        else:
            out = self._take_runs(n)
        for b in out:
            self._ref[b] = 1
        return out

    def _take_runs(self, n: int) -> list[int]:
        free = sorted(self._free)
        runs, start = [], 0  # (length, first index into `free`)
        for i in range(1, len(free) + 1):
            if i == len(free) or free[i] != free[i - 1] + 1:
                runs.append((i - start, start))
                start = i
        fits = [r for r in runs if r[0] >= n]
        chosen = [min(fits)] if fits else sorted(runs, key=lambda r: -r[0])
        out: list[int] = []
        for length, first in chosen:
            out += free[first:first + min(length, n - len(out))]
            if len(out) == n:
                break
        taken = set(out)
        # Rebuilt highest id first, so later `allocate` calls pop low ids in order again.
        self._free = [b for b in reversed(free) if b not in taken]
        return out

    def match_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Take a reference on the cached blocks of the longest cached prefix of `hashes`."""
        if not self.enable_prefix_caching:
            return []
        out = self.prefix_cache.match(hashes)
        for b in out:
            self._take(b)
        return out

    def share(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on blocks already in use (e.g. a forked sequence)."""
        for b in block_ids:
            if self._ref[b] < 1:
                raise ValueError(f"block {b} is not in use; cannot share it")
            self._ref[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block; unreferenced blocks become free or evictable."""
        for b in block_ids:
            if self._ref[b] < 1:
                raise ValueError(f"double free of block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0 and not self.prefix_cache.unlock(b):
                self._free.append(b)

    def commit_hash(self, block_id: int, block_hash: BlockHash) -> None:
        """Make a full, written block findable by its hash (no-op when caching is off).

        If another block already holds the same hash, the first one stays the canonical
        copy and this block stays private.
        """
        if self.enable_prefix_caching:
            self.prefix_cache.insert(block_id, block_hash)

    def reset_prefix_cache(self) -> int:
        """Drop every evictable cached block back to the free list; returns how many."""
        freed = self.prefix_cache.clear()
        self._free.extend(freed)
        return len(freed)

    # ---- internals -----------------------------------------------------------------------

    def _take(self, b: int) -> None:
        if self._ref[b] == 0:
            self.prefix_cache.lock(b)
        self._ref[b] += 1
