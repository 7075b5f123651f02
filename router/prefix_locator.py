"""Where a prompt's prefix is cached, for the KV-aware routing policy.

The router hashes the prompt's full blocks exactly as the engine does (`hash_blocks`:
parent hash, the block's token ids, the content key digest; never the last token's block,
whose logits must be computed) and asks a `PrefixLocator` once per request which leading
blocks each candidate worker holds in its own prefix cache and which its node's store
pool holds. The answer is a `PrefixMap`, a snapshot the policy prices synchronously.

Two implementations; the launcher builds `PublishedPrefixLocator` when the store's index
runs and the workers publish their caches (`kv_store.cache_events`, the default), else
`RoutedPrefixLocator`:

- `RoutedPrefixLocator` **approximates own caches from routing**, the way SGLang's router
  keeps an approximate radix tree per worker: every prompt routed to a worker is recorded
  as held there (a worker caches the full blocks of every prompt it prefilled or
  reserved), in a per-worker LRU bounded by the worker's KV pool size (its polled
  `total_blocks`). It does not see evictions forced by output tokens or by another
  router, nor a restart it was not told about (`forget` on replacement). A wrong guess
  costs only routing quality, never correctness: the worker matches its real cache on
  admission and computes the rest.
- `PublishedPrefixLocator` **reads own caches exactly**, from what each worker publishes to
  the index as its cache changes (kv_store/cache_events.py, the way NVIDIA Dynamo's
  workers publish KV events): evictions included, a replaced process's claims dropped by
  its successor. It keeps the routed estimate too and answers from it for a worker that
  has not published (yet), and for every worker while Redis is unreachable.

Both read **store pools exactly, from the index**, in one pipelined Redis call per request
(`EXISTS lease` + `HMGET idx h1..hn` per node, and for the published caches `HMGET` per
worker), never a round trip per block. Redis unreachable: the store counts as empty for
`retry_s` (every answer at once, no waiting).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.kv_cache.block_hash import BlockHash, hash_blocks
from pdserve.kv_store.index import CACHE_EPOCH_FIELD, pool_key_prefix, worker_cache_key

log = logging.getLogger("pdserve.router")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, compat_key: str
                        ) -> list[BlockHash]:
    """The hashes of the prompt's blocks a cached prefix may cover (the engine's
    `Scheduler.prefix_hashes`): full blocks, never the one holding the last token."""
    usable = (len(token_ids) - 1) // block_size * block_size
    return hash_blocks(list(token_ids[:usable]), block_size, compat_key)


def _leading(bits: Sequence[bool], start: int = 0) -> int:
    n = 0
    for b in bits[start:]:
        if not b:
            break
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class PrefixMap:
    """Per block of a prompt's prefix: held in each worker's own cache / each node's pool.

    `local[w][i]` / `store[node][i]`: block i is held. Workers and nodes absent hold
    nothing. Answers are in tokens, whole blocks only."""

    num_tokens: int
    block_size: int
    hashes: tuple[BlockHash, ...]
    local: dict[str, tuple[bool, ...]] = field(default_factory=dict)
    store: dict[str, tuple[bool, ...]] = field(default_factory=dict)

    def local_tokens(self, worker_id: str) -> int:
        """Tokens of the leading blocks in `worker_id`'s own prefix cache."""
        return _leading(self.local.get(worker_id, ())) * self.block_size

    def store_tokens(self, node: str | None, after: int) -> int:
        """Tokens of the leading run of blocks in `node`'s pool that starts at token
        `after` (what the worker holds itself): the store loads past the own cache's
        prefix, so the two never count a token twice."""
        if node is None or after % self.block_size:
            return 0
        return _leading(self.store.get(node, ()), after // self.block_size) * self.block_size


class PrefixLocator(ABC):
    """Answers where a prompt's prefix is cached.

    Invariants: `locate` costs at most one round trip to any index, whatever the prompt's
    length; it never raises for an index that is down (the answer is then "not held", or
    an in-process estimate); an answer for a worker never counts blocks its previous
    process held once `forget` was called for it (or its successor published); `routed`
    and `forget` are quick, in-process, and never block."""

    def __init__(self, block_size: int):
        self.block_size = block_size

    @abstractmethod
    async def locate(self, num_tokens: int, hashes: Sequence[BlockHash],
                     workers: Sequence[str], nodes: Sequence[str]) -> PrefixMap:
        """What each of `workers` holds in its own cache and each of `nodes` in its pool,
        of the blocks `hashes` of a prompt of `num_tokens` tokens (`prompt_block_hashes`)."""

    def routed(self, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        """A prompt with these block hashes was sent to `worker_id` (a locator that learns
        from the workers' own cache events may ignore it)."""
        return None

    def forget(self, worker_id: str) -> None:
        """`worker_id` is a fresh process: it holds nothing yet."""
        return None

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        """`worker_id`'s KV pool holds `blocks` blocks (its polled total)."""
        return None

    async def close(self) -> None:
        """Release connections."""
        return None


class RoutedPrefixLocator(PrefixLocator):
    """Own caches from the routing history, store pools from the Redis index (module
    docstring). `redis_url` None: no store (every pool answers "not held")."""

    def __init__(self, block_size: int, redis_url: str | None, namespace: str = "pdkv",
                 default_capacity: int = 4096, retry_s: float = 1.0,
                 timeout_s: float = 0.25):
        super().__init__(block_size)
        self.namespace = namespace
        self.default_capacity = default_capacity
        self.retry_s = retry_s
        self._held: dict[str, OrderedDict[BlockHash, None]] = {}
        self._capacity: dict[str, int] = {}
        self._down_until = 0.0
        self.errors = 0
        self._redis = None
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s,
                                                  socket_connect_timeout=timeout_s)

    async def locate(self, num_tokens, hashes, workers, nodes) -> PrefixMap:
        published, store = await self._read_index(hashes, workers, nodes) if hashes \
            else ({}, {})
        local = {}
        for w in workers:
            if w in published:
                local[w] = published[w]
            elif held := self._held.get(w):
                local[w] = tuple(h in held for h in hashes)
        return PrefixMap(num_tokens, self.block_size, tuple(hashes), local, store)

    def _published_workers(self, workers: Sequence[str]) -> Sequence[str]:
        """The workers whose published caches `locate` reads (none: all estimated)."""
        return ()

    def routed(self, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        held = self._held.setdefault(worker_id, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        cap = self._capacity.get(worker_id, self.default_capacity)
        while len(held) > cap:
            held.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        self._held.pop(worker_id, None)

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        if blocks > 0:
            self._capacity[worker_id] = blocks

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _read_index(self, hashes: Sequence[BlockHash], workers: Sequence[str],
                          nodes: Sequence[str]
                          ) -> tuple[dict[str, tuple[bool, ...]], dict[str, tuple[bool, ...]]]:
        """({worker: bits} of the published caches, {node: bits} of the live pools), from
        one pipelined call; ({}, {}) while Redis is unreachable."""
        readers = self._published_workers(workers)
        if self._redis is None or not (nodes or readers) \
                or time.monotonic() < self._down_until:
            return {}, {}
        import redis

        pipe = self._redis.pipeline(transaction=False)
        for node in nodes:
            p = pool_key_prefix(self.namespace, node)
            pipe.exists(p + "lease")
            pipe.hmget(p + "idx", list(hashes))
        for w in readers:
            pipe.hmget(worker_cache_key(self.namespace, w), [CACHE_EPOCH_FIELD, *hashes])
        try:
            answers = await pipe.execute()
        except (redis.RedisError, OSError, TimeoutError) as e:
            self.errors += 1
            self._down_until = time.monotonic() + self.retry_s
            log.warning("KV store index unreachable for routing (%s): store counted empty "
                        "and own caches estimated for %.1fs", e, self.retry_s)
            return {}, {}
        store = {}
        for i, node in enumerate(nodes):
            alive, slots = answers[2 * i], answers[2 * i + 1]
            if alive:  # a pool whose store process died is a miss (kv_store/index.py)
                store[node] = tuple(s is not None for s in slots)
        published = {}
        for w, fields in zip(readers, answers[2 * len(nodes):]):
            if self._current_epoch(w, fields[0]):
                published[w] = tuple(f is not None for f in fields[1:])
        return published, store

    def _current_epoch(self, worker_id: str, epoch: bytes | None) -> bool:
        """Whether a published cache with this epoch is the worker's current process's."""
        return False


class PublishedPrefixLocator(RoutedPrefixLocator):
    """Own caches from what the workers publish to the index, store pools from the index
    (module docstring); the routed estimate for a worker without a published cache, and
    for every worker while Redis is down. Needs `redis_url`.

    `forget` retires the epoch last read for the worker: should its successor not have
    taken the key over yet (it could not reach Redis when it started), the old process's
    claims are not believed. Claims of an epoch this locator never read would be, until
    they expire (`kv_store.cache_events_ttl_seconds`)."""

    def __init__(self, block_size: int, redis_url: str, **kwargs):
        if not redis_url:
            raise ValueError("PublishedPrefixLocator reads the store's index: give its URL")
        super().__init__(block_size, redis_url, **kwargs)
        self._epoch: dict[str, bytes] = {}  # the last epoch each worker published under
        self._retired: dict[str, bytes] = {}  # the epoch of a process `forget` replaced

    def _published_workers(self, workers: Sequence[str]) -> Sequence[str]:
        return workers

    def _current_epoch(self, worker_id: str, epoch: bytes | None) -> bool:
        # No epoch: it has not published (yet), or its claims expired. The retired epoch:
        # the successor has not taken the key over yet (it could not reach Redis).
        if epoch is None or self._retired.get(worker_id) == epoch:
            return False
        self._epoch[worker_id] = epoch
        return True

    def forget(self, worker_id: str) -> None:
        super().forget(worker_id)
        if (old := self._epoch.pop(worker_id, None)) is not None:
            self._retired[worker_id] = old
