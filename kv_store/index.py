"""The store's index in Redis: block hash -> (slot, generation) in a node's pool, with the
pool's free list, LRU order, read pins and write leases beside it.

Every operation is one Lua script (one round trip, atomic for all of a request's blocks),
so workers on a node can share a pool without a coordinator process in the data path:

- `alloc`: slots for the hashes not indexed yet, from the free list or by evicting the
  least recently used slot that no reader pins. The evicted hash leaves the index in the
  same script, before its slot is handed out for reuse. A slot being written is in no list
  (not findable, not evictable) until `commit`; a writer that died is reclaimed when its
  write lease runs out.
- `commit`: written slots become findable (index entry + LRU tail).
- `pin`: the longest indexed prefix of a list of hashes, each slot pinned (a counter with
  a lease, so a reader that died cannot pin a slot forever) and moved to the LRU tail.
- `unpin`: the reader is done.

Every script first checks the node's store lease (the store process refreshes it): a store
that died makes its node's pool a miss within one lease. Redis unreachable makes the whole
index a miss (`StoreIndex.available`) until a retry finds it again; a restarted Redis is
empty, the store process re-registers its pool, and puts refill it.

Beside the pools, each worker's own prefix cache (`worker_cache_key`): a hash whose
`epoch` field names the worker process that owns it and whose other fields are the block
hashes that process holds (`publish_cache`, written by kv_store/cache_events.py, read by
the router's locator). Only the owning epoch may change it, a new process takes it over
(its earlier claims gone in the same script), and it expires unless refreshed, so a dead
or replaced worker's claims vanish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis

log = logging.getLogger("pdserve.kv_store")

T = TypeVar("T")

_INIT = """
local p = ARGV[1]
for _, k in ipairs(redis.call('KEYS', p .. '*')) do redis.call('DEL', k) end
redis.call('HSET', p .. 'meta', 'path', ARGV[2], 'slots', ARGV[3])
redis.call('SET', p .. 'gen', ARGV[4])
local n = tonumber(ARGV[3])
local batch = {}
for s = 0, n - 1 do
  batch[#batch + 1] = s
  if #batch == 1000 or s == n - 1 then
    redis.call('RPUSH', p .. 'free', unpack(batch)); batch = {}
  end
end
redis.call('SET', p .. 'lease', '1', 'PX', ARGV[5])
return 1
"""

# ARGV: prefix, now_ms, write_lease_ms, hash...  -> {path, hash, slot, gen, hash, slot, gen, ...}
_ALLOC = """
local p = ARGV[1]
if redis.call('EXISTS', p .. 'lease') == 0 then return {} end
local now = tonumber(ARGV[2])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', p .. 'writing', '-inf', now)) do
  redis.call('ZREM', p .. 'writing', m)
  redis.call('RPUSH', p .. 'free', string.match(m, '^(%d+):'))
end
local out = {redis.call('HGET', p .. 'meta', 'path')}
for i = 4, #ARGV do
  local h = ARGV[i]
  if redis.call('HEXISTS', p .. 'idx', h) == 0 then
    local slot = redis.call('LPOP', p .. 'free')
    if not slot then
      for _, s in ipairs(redis.call('ZRANGE', p .. 'lru', 0, 127)) do
        if redis.call('EXISTS', p .. 'pin:' .. s) == 0 then slot = s; break end
      end
      if slot then
        local old = redis.call('HGET', p .. 'slot', slot)
        if old then redis.call('HDEL', p .. 'idx', old) end
        redis.call('HDEL', p .. 'slot', slot)
        redis.call('ZREM', p .. 'lru', slot)
        redis.call('HINCRBY', p .. 'stats', 'evictions', 1)
      end
    end
    if not slot then break end
    local gen = string.format('%d', redis.call('INCR', p .. 'gen'))  -- exact, not %.14g
    redis.call('ZADD', p .. 'writing', now + tonumber(ARGV[3]), slot .. ':' .. gen)
    out[#out + 1] = h; out[#out + 1] = slot; out[#out + 1] = gen
  end
end
return out
"""

# ARGV: prefix, hash, slot, gen, ...  -> number committed
_COMMIT = """
local p = ARGV[1]
local done = 0
for i = 2, #ARGV, 3 do
  local h, slot, gen = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('ZREM', p .. 'writing', slot .. ':' .. gen) == 1 then
    if redis.call('EXISTS', p .. 'lease') == 1 and redis.call('HEXISTS', p .. 'idx', h) == 0 then
      redis.call('HSET', p .. 'idx', h, slot .. ':' .. gen)
      redis.call('HSET', p .. 'slot', slot, h)
      redis.call('ZADD', p .. 'lru', redis.call('INCR', p .. 'tick'), slot)
      done = done + 1
    else
      redis.call('RPUSH', p .. 'free', slot)
    end
  end
end
redis.call('HINCRBY', p .. 'stats', 'puts', done)
return done
"""

# ARGV: prefix, pin_lease_ms, hash...  -> {path, slot, gen, slot, gen, ...} ({} if no store)
_PIN = """
local p = ARGV[1]
if redis.call('EXISTS', p .. 'lease') == 0 then return {} end
local out = {redis.call('HGET', p .. 'meta', 'path')}
for i = 3, #ARGV do
  local v = redis.call('HGET', p .. 'idx', ARGV[i])
  if not v then break end
  local slot, gen = string.match(v, '^(%d+):(%d+)$')
  redis.call('INCR', p .. 'pin:' .. slot)
  redis.call('PEXPIRE', p .. 'pin:' .. slot, ARGV[2])
  redis.call('ZADD', p .. 'lru', redis.call('INCR', p .. 'tick'), slot)
  out[#out + 1] = slot; out[#out + 1] = gen
end
return out
"""

# ARGV: namespace, own node, hash...  -> {own_n, node, address, n, ...}: how many leading
# hashes the own node's pool indexes, then, for every other node whose pool is registered
# with a read address and whose store holds its lease, how many leading hashes its pool
# indexes (nodes holding no more than the own node left out).
_LOCATE = """
local ns, own = ARGV[1], ARGV[2]
local function held(node)
  local p = ns .. ':' .. node .. ':'
  if redis.call('EXISTS', p .. 'lease') == 0 then return 0 end
  local n = 0
  for i = 3, #ARGV do
    if redis.call('HEXISTS', p .. 'idx', ARGV[i]) == 0 then break end
    n = n + 1
  end
  return n
end
local mine = held(own)
local out = {mine}
local peers = redis.call('HGETALL', ns .. ':peers')
for j = 1, #peers, 2 do
  local node = peers[j]
  if node ~= own then
    local n = held(node)
    if n > mine then out[#out + 1] = node; out[#out + 1] = peers[j + 1]; out[#out + 1] = n end
  end
end
return out
"""

_UNPIN = """
local p = ARGV[1]
for i = 2, #ARGV do
  local k = p .. 'pin:' .. ARGV[i]
  if redis.call('DECR', k) <= 0 then redis.call('DEL', k) end
end
return 1
"""


# KEYS[1]: a worker's cache hash. ARGV: epoch, ttl_ms, mode, n_added, added..., removed...
# mode 'start': take the key over (a new process); 'resync': rewrite it if it is gone or
# ours; 'delta': change it only if ours; 'drop': delete it if ours.
_PUBLISH = """
local k, epoch, mode = KEYS[1], ARGV[1], ARGV[3]
local cur = redis.call('HGET', k, 'epoch')
if mode ~= 'start' then
  if cur and cur ~= epoch then return 'taken' end
  if not cur and mode == 'delta' then return 'missing' end
end
if mode == 'drop' then redis.call('DEL', k); return 'ok' end
if mode ~= 'delta' then
  redis.call('DEL', k)
  redis.call('HSET', k, 'epoch', epoch)
end
local n = tonumber(ARGV[4])
for i = 5, 4 + n do redis.call('HSET', k, ARGV[i], '1') end
for i = 5 + n, #ARGV do redis.call('HDEL', k, ARGV[i]) end
redis.call('PEXPIRE', k, ARGV[2])
return 'ok'
"""

CACHE_EPOCH_FIELD = "epoch"  # never a block hash's field: those are 16 bytes


def worker_cache_key(namespace: str, worker_id: str) -> str:
    """The Redis hash of what `worker_id`'s own prefix cache holds (kv_store/cache_events.py
    writes it, the router's locator reads it). Never under a pool's prefix: a node id is no
    `cache` path segment."""
    return f"{namespace}:cache:{worker_id}"


def pool_key_prefix(namespace: str, node: str) -> str:
    """The prefix of every Redis key of `node`'s pool (the router's locator reads
    `<prefix>idx` and `<prefix>lease` too)."""
    return f"{namespace}:{node}:"


@dataclass(frozen=True, slots=True)
class SlotRef:
    """One block in a pool: which slot, and which write of it (generation)."""

    block_hash: bytes
    slot: int
    gen: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A node pool's occupancy, from the index."""

    capacity_blocks: int
    used_blocks: int
    pinned_blocks: int
    evictions: int
    puts: int


class StoreIndex:
    """One Redis connection with the store's scripts. Thread-safe (redis-py pools
    connections). Any Redis error turns the index off for `retry_s`: every call in that
    window answers "nothing" at once, so a dead Redis costs the engine no waiting."""

    def __init__(self, url: str, namespace: str = "pdkv", retry_s: float = 1.0,
                 timeout_s: float = 0.5):
        self.url = url
        self.namespace = namespace
        self.retry_s = retry_s
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._scripts = {name: self._redis.register_script(src) for name, src in (
            ("init", _INIT), ("alloc", _ALLOC), ("commit", _COMMIT), ("pin", _PIN),
            ("unpin", _UNPIN), ("publish", _PUBLISH), ("locate", _LOCATE))}
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.errors = 0

    def prefix(self, node: str) -> str:
        return pool_key_prefix(self.namespace, node)

    @property
    def _peers_key(self) -> str:
        """node -> the address its store serves reads of its pool at (kv_store/peer_service)."""
        return f"{self.namespace}:peers"

    @property
    def available(self) -> bool:
        """False while a recent Redis error keeps the index off."""
        return time.monotonic() >= self._down_until

    def close(self) -> None:
        self._redis.close()

    # ---- the store process ----------------------------------------------------------------

    def register_pool(self, node: str, path: str, num_slots: int, lease_ms: int,
                      peer_address: str | None = None) -> bool:
        """(Re)start `node`'s pool: forget everything indexed for it, all slots free. With
        `peer_address`, workers on other nodes read the pool there (`locate`)."""
        gen0 = time.time_ns() // 1000  # above any generation a previous Redis handed out

        def init():
            self._scripts["init"](args=[self.prefix(node), path, num_slots, gen0, lease_ms])
            if peer_address:
                self._redis.hset(self._peers_key, node, peer_address)
            return True

        return self._run(init) is not None

    def heartbeat(self, node: str, path: str, lease_ms: int) -> str:
        """Refresh the store lease. Returns 'ok', 'unregistered' (Redis lost the pool: it
        restarted), 'taken' (another store process registered the node) or 'down'."""
        p = self.prefix(node)

        def beat():
            current = self._redis.hget(p + "meta", "path")
            if current is None:
                return "unregistered"
            if current != path.encode():
                return "taken"
            self._redis.set(p + "lease", "1", px=lease_ms)
            return "ok"

        # Not held back by a recent error's off window: the beat runs on the store's own
        # thread every quarter lease, and one Redis timeout (0.5 s) plus a skipped window
        # (1 s) would otherwise let a 2 s lease lapse and make a live pool a miss.
        return self._run(beat, gated=False) or "down"

    def unregister_pool(self, node: str, path: str) -> None:
        p = self.prefix(node)

        def drop():
            if self._redis.hget(p + "meta", "path") == path.encode():
                keys = list(self._redis.scan_iter(match=p + "*", count=1000))
                if keys:
                    self._redis.delete(*keys)
                self._redis.hdel(self._peers_key, node)
            return True

        self._run(drop)

    def pool_stats(self, node: str) -> PoolStats | None:
        p = self.prefix(node)

        def read():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hget(p + "meta", "slots").hlen(p + "idx").hgetall(p + "stats")
            pipe.keys(p + "pin:*")
            slots, used, stats, pins = pipe.execute()
            return PoolStats(int(slots or 0), int(used), len(pins),
                             int(stats.get(b"evictions", 0)), int(stats.get(b"puts", 0)))

        return self._run(read)

    # ---- workers ----------------------------------------------------------------------------

    def alloc(self, node: str, hashes: Sequence[bytes], write_lease_ms: int = 30_000
              ) -> tuple[str, list[SlotRef]] | None:
        """Slots to write the hashes that are not indexed yet (in order; fewer when every
        other slot is pinned or being written). None if there is no store or no Redis."""
        if not hashes:
            return None
        out = self._run(lambda: self._scripts["alloc"](
            args=[self.prefix(node), int(time.time() * 1000), write_lease_ms, *hashes]))
        if not out:
            return None
        path, rest = out[0].decode(), out[1:]
        return path, [SlotRef(bytes(rest[i]), int(rest[i + 1]), int(rest[i + 2]))
                      for i in range(0, len(rest), 3)]

    def commit(self, node: str, written: Sequence[SlotRef]) -> int:
        """Make written slots findable; returns how many were (a slot whose write lease ran
        out, or whose hash another writer indexed first, goes back to the free list)."""
        if not written:
            return 0
        args: list = [self.prefix(node)]
        for ref in written:
            args += [ref.block_hash, ref.slot, ref.gen]
        return int(self._run(lambda: self._scripts["commit"](args=args)) or 0)

    def pin(self, node: str, hashes: Sequence[bytes], lease_ms: int
            ) -> tuple[str, list[SlotRef]] | None:
        """Pin the longest indexed prefix of `hashes`; None if there is no store."""
        if not hashes:
            return None
        out = self._run(lambda: self._scripts["pin"](
            args=[self.prefix(node), lease_ms, *hashes]))
        if not out:
            return None
        path, rest = out[0].decode(), out[1:]
        return path, [SlotRef(hashes[i // 2], int(rest[i]), int(rest[i + 1]))
                      for i in range(0, len(rest), 2)]

    def pool_path(self, node: str) -> str | None:
        """The file of `node`'s pool while its store process holds the lease; else None."""
        p = self.prefix(node)

        def read():
            pipe = self._redis.pipeline(transaction=False)
            alive, path = pipe.exists(p + "lease").hget(p + "meta", "path").execute()
            return path.decode() if alive and path else None

        return self._run(read)

    def locate(self, own_node: str, hashes: Sequence[bytes]
               ) -> tuple[int, list[tuple[str, str, int]]]:
        """How many leading `hashes` `own_node`'s pool indexes, and (node, read address,
        leading hashes held) of every other node's live pool that holds more, longest
        first; (0, []) without Redis. One round trip, no pins: a hint (the holder pins and
        checks when it serves the read)."""
        if not hashes:
            return 0, []
        out = self._run(lambda: self._scripts["locate"](
            args=[self.namespace, own_node, *hashes]))
        if not out:
            return 0, []
        found = [(out[i].decode(), out[i + 1].decode(), int(out[i + 2]))
                 for i in range(1, len(out), 3)]
        return int(out[0]), sorted(found, key=lambda f: -f[2])

    def has_peers(self, own_node: str) -> bool:
        """Whether any node other than `own_node` serves reads of its pool (False without
        Redis). One cheap command: pullers ask it now and then, not per request."""
        nodes = self._run(lambda: self._redis.hkeys(self._peers_key))
        return any(n.decode() != own_node for n in nodes or ())

    def unpin(self, node: str, refs: Sequence[SlotRef]) -> None:
        if refs:
            self._run(lambda: self._scripts["unpin"](
                args=[self.prefix(node), *(r.slot for r in refs)]))

    # ---- workers' own prefix caches ---------------------------------------------------------

    def publish_cache(self, worker_id: str, epoch: str, mode: str, added: Sequence[bytes],
                      removed: Sequence[bytes], ttl_ms: int) -> str:
        """Change `worker_id`'s published cache as process `epoch` (`_PUBLISH`'s modes) and
        refresh its expiry, in one script. Returns 'ok'; 'missing' (a delta found no key:
        it expired or Redis restarted, so the caller resyncs); 'taken' (another process
        owns it now); 'down' (no Redis)."""
        if mode not in ("start", "resync", "delta", "drop"):
            raise ValueError(f"unknown publish mode {mode!r}")
        out = self._run(lambda: self._scripts["publish"](
            keys=[worker_cache_key(self.namespace, worker_id)],
            args=[epoch, ttl_ms, mode, len(added), *added, *removed]))
        return "down" if out is None else out.decode()

    # ---- internals ----------------------------------------------------------------------------

    def _run(self, fn: Callable[[], T], gated: bool = True) -> T | None:
        if gated and not self.available:
            return None
        try:
            return fn()
        except redis.RedisError as e:
            with self._lock:
                self.errors += 1
                first = self._down_until <= time.monotonic()
                self._down_until = time.monotonic() + self.retry_s
            if first:
                log.warning("KV store index unreachable (%s): store off for %.1fs", e,
                            self.retry_s)
            return None
