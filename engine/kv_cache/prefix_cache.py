"""The prefix cache: which KV blocks hold which block hashes, and which may be evicted.

A seam (DESIGN.md): the block manager asks it for a prompt's cached prefix, makes written
blocks findable through it, and takes a block from it when the free list is empty. Other
tiers (the global KV store) and the router's index subscribe to its `stored` / `evicted`
events to learn what this worker holds, by block hash: a hash means the same prefix on
every worker (engine/kv_cache/block_hash.py).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.engine.kv_cache.block_hash import BlockHash


class CacheEventKind(enum.StrEnum):
    STORED = "stored"  # the blocks became findable by these hashes
    EVICTED = "evicted"  # these hashes are no longer held here


@dataclass(frozen=True, slots=True)
class CacheEvent:
    kind: CacheEventKind
    block_hashes: tuple[BlockHash, ...]


CacheListener = Callable[[CacheEvent], None]


class PrefixCache(ABC):
    """Block hash -> block id for full, written blocks, with eviction of unused ones.

    The cache holds ids only; reference counts and the free list stay in the block manager,
    which calls `lock` when a cached block's reference count leaves 0 and `unlock` when it
    returns to 0 (locks are not counted: a block is locked or not).

    Invariants:
    - a block is *cached* from `insert` until it is reported evicted; while cached, it is
      the only block `match` finds for its hash;
    - a cached block is *locked* (some request uses it) or *evictable*; a locked block is
      never evicted, by `evict` or by `clear`;
    - `insert` is called only for blocks whose KV is completely written, so no reader can
      match a block that is still being computed; a block is locked when inserted;
    - a block's hash is reported `evicted` (and forgotten) before `evict` returns its id, so
      no subscriber believes a hash is here while its slot already holds other KV;
    - `stored` is emitted once a block is findable, `evicted` once it is not: subscribers
      see, per hash, an alternation stored, evicted, stored, ...

    Listeners run synchronously on the engine's thread, inside the block manager's
    operation: they must be quick and must not call back into the cache or the engine.
    """

    def __init__(self) -> None:
        self._listeners: list[CacheListener] = []

    def subscribe(self, listener: CacheListener) -> Callable[[], None]:
        """Call `listener(event)` on every later event; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, kind: CacheEventKind, hashes: Sequence[BlockHash]) -> None:
        if hashes and self._listeners:
            event = CacheEvent(kind, tuple(hashes))
            for listener in list(self._listeners):
                listener(event)

    @property
    @abstractmethod
    def num_cached(self) -> int:
        """Blocks findable by hash (locked or evictable)."""

    @property
    @abstractmethod
    def num_evictable(self) -> int:
        """Cached blocks no request uses: reclaimable by `evict`."""

    @abstractmethod
    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding `block_hash`, if cached (locks nothing)."""

    @abstractmethod
    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes`, in order. Locks nothing: the
        caller locks (takes references on) the ones it keeps before evicting anything."""

    @abstractmethod
    def insert(self, block_id: int, block_hash: BlockHash) -> bool:
        """Make a written, in-use block findable by `block_hash` (emits `stored`). False, and
        nothing changes, if the block is already cached or another block holds the hash."""

    @abstractmethod
    def lock(self, block_id: int) -> None:
        """A cached block got a user: it is not evictable until `unlock`. No-op if the block
        is not cached."""

    @abstractmethod
    def unlock(self, block_id: int) -> bool:
        """A cached block lost its last user: it becomes evictable (most recently used).
        False if the block is not cached: then the caller owns the free slot."""

    @abstractmethod
    def evict(self) -> int | None:
        """Forget one evictable block (emits `evicted` first) and return its id for reuse;
        None if every cached block is locked."""

    @abstractmethod
    def clear(self) -> list[int]:
        """Evict every evictable block (one `evicted` event); returns their ids."""


class LRUPrefixCache(PrefixCache):
    """Hash-indexed cache that evicts the least recently unlocked block first.

    Freed sequences unlock their blocks tail first (engine.scheduler), so under memory
    pressure a cached prefix loses its last blocks before its first ones and what remains
    is still a matchable prefix.
    """

    def __init__(self) -> None:
        super().__init__()
        self._hash_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        out = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def insert(self, block_id: int, block_hash: BlockHash) -> bool:
        if block_id in self._hash_of or block_hash in self._block_of:
            return False
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        self._emit(CacheEventKind.STORED, [block_hash])
        return True

    def lock(self, block_id: int) -> None:
        self._evictable.pop(block_id, None)

    def unlock(self, block_id: int) -> bool:
        if block_id not in self._hash_of:
            return False
        self._evictable[block_id] = None
        return True

    def evict(self) -> int | None:
        if not self._evictable:
            return None
        b, _ = self._evictable.popitem(last=False)
        self._emit(CacheEventKind.EVICTED, [self._forget(b)])
        return b

    def clear(self) -> list[int]:
        ids = list(self._evictable)
        self._evictable.clear()
        self._emit(CacheEventKind.EVICTED, [self._forget(b) for b in ids])
        return ids

    def _forget(self, block_id: int) -> BlockHash:
        h = self._hash_of.pop(block_id)
        del self._block_of[h]
        return h
