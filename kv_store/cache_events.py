"""A worker publishes what its own prefix cache holds to the store's index, as it changes
(the way NVIDIA Dynamo's workers publish KV events), so the KV-aware router knows each
worker's cached prefixes exactly instead of guessing them from what it routed there.

The engine's prefix cache emits `stored` / `evicted` events on the engine thread
(engine/kv_cache/prefix_cache.py); `CachePublisher.on_event` only appends them to a
queue, so the step pays one append per event. A background thread drains the queue every
`interval_s`, folds the events into its mirror of the cache, and writes the net change
since its last write in one script call (`StoreIndex.publish_cache`: one round trip per
`CHUNK` blocks), never from the engine thread.

Keys and lifetimes (kv_store/index.py, `worker_cache_key`): one Redis hash per worker id,
owned by an *epoch* (a random id per publisher, so per process). A new process takes the
key over when it starts, which drops the claims of the process it replaces before it
reports ready; a process that finds another epoch in the key stops publishing. Each write
refreshes the key's expiry (`ttl_s`), and an idle publisher refreshes it every quarter of
it, so a worker that died without being replaced stops claiming anything within `ttl_s`.
Redis unreachable, or restarted empty: the next write that succeeds rewrites the whole
mirror (`resync`), so the index converges to the cache again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque

from pdserve.engine.kv_cache.block_hash import BlockHash
from pdserve.engine.kv_cache.prefix_cache import CacheEvent, CacheEventKind
from pdserve.kv_store.index import StoreIndex

log = logging.getLogger("pdserve.kv_store")

CHUNK = 4096  # hashes per script call


class CachePublisher:
    """Publishes one worker's prefix-cache contents under `worker_id` (module docstring).

    Invariants: what the index holds for `worker_id` is, at most `interval_s` plus one
    round trip after the events, the set of hashes this process's cache holds (while Redis
    is up and no other process took the key); it never names a hash of another process.
    `on_event` never blocks and never touches Redis."""

    def __init__(self, index: StoreIndex, worker_id: str, interval_s: float = 0.05,
                 ttl_s: float = 10.0):
        if interval_s <= 0 or ttl_s <= 4 * interval_s:
            raise ValueError(f"need 0 < 4 * interval_s < ttl_s, got {interval_s}, {ttl_s}")
        self.index = index
        self.worker_id = worker_id
        self.epoch = secrets.token_hex(8)
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        self.writes = 0  # successful script calls
        self.failures = 0  # calls that found no Redis
        self._events: deque[CacheEvent] = deque()
        self._held: set[BlockHash] = set()  # the mirror: what the cache holds now
        self._dirty: set[BlockHash] = set()  # changed since the last successful write
        self._mode = "start"
        self._taken = False
        self._next_beat = 0.0
        self._lock = threading.Lock()  # flush() from the thread and from close()/tests
        self._stop = threading.Event()
        self.flush()  # take the key over now: a replaced process's claims go before ready
        self._thread = threading.Thread(target=self._loop, name="kv-cache-events",
                                        daemon=True)
        self._thread.start()

    @property
    def taken(self) -> bool:
        """Another process publishes under this worker id now: this one stopped."""
        return self._taken

    def on_event(self, event: CacheEvent) -> None:
        """The engine-thread listener (`LLMEngine.subscribe_cache_events`)."""
        self._events.append(event)

    def flush(self) -> str:
        """Write what changed since the last write (or the whole mirror after a failure);
        returns the index's answer ('ok', 'missing', 'taken', 'down'), or 'idle' when
        there was nothing to write and no expiry to refresh."""
        with self._lock:
            while self._events:
                event = self._events.popleft()
                if event.kind is CacheEventKind.STORED:
                    self._held.update(event.block_hashes)
                else:
                    self._held.difference_update(event.block_hashes)
                self._dirty.update(event.block_hashes)
            if self._taken:
                return "taken"
            now = time.monotonic()
            if self._mode == "delta" and not self._dirty and now < self._next_beat:
                return "idle"
            if self._mode == "delta":
                added = [h for h in self._dirty if h in self._held]
                removed = [h for h in self._dirty if h not in self._held]
            else:
                added, removed = list(self._held), []
            state = self._write(added, removed)
            if state == "ok":
                self.writes += 1
                self._dirty.clear()
                self._mode = "delta"
                self._next_beat = now + self.ttl_ms / 4000
            elif state == "taken":
                self._taken = True
                log.warning("another process publishes %s's prefix cache now: this one "
                            "stops", self.worker_id)
            else:  # down or missing: rewrite everything once Redis answers
                self.failures += 1
                if self._mode == "delta":
                    self._mode = "resync"
            return state

    def _write(self, added: list[BlockHash], removed: list[BlockHash]) -> str:
        """One script call per `CHUNK` hashes (a large pool's resync would otherwise be one
        call long enough to time out): the first in the current mode, the rest deltas."""
        ops = [(h, True) for h in added] + [(h, False) for h in removed]
        mode = self._mode
        for i in range(0, max(len(ops), 1), CHUNK):
            part = ops[i:i + CHUNK]
            state = self.index.publish_cache(
                self.worker_id, self.epoch, mode, [h for h, add in part if add],
                [h for h, add in part if not add], self.ttl_ms)
            if state != "ok":
                return state
            if self._mode == "start":
                self._mode = "resync"  # the key is ours: a retry must not take it again
            mode = "delta"
        return "ok"

    def close(self) -> None:
        """Stop publishing and withdraw this process's claims (if it still owns them)."""
        self._stop.set()
        self._thread.join(2)
        with self._lock:
            if not self._taken:
                self.index.publish_cache(self.worker_id, self.epoch, "drop", [], [],
                                         self.ttl_ms)
        self.index.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a bad write is retried as a resync
                log.exception("publishing %s's prefix cache failed", self.worker_id)
                with self._lock:
                    self._mode = "start" if self._mode == "start" else "resync"
