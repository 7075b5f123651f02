"""A worker's mapping of its node's block pool (kv_store/pool.py), as the index names it.

The store process makes the pool file and registers its path in the index; a worker maps
the file the first time it needs it, and again when a replaced store process made a new
one. On a CUDA worker the mapping is also page-locked for DMA (`BlockPool.pin_for_cuda`),
which costs about a second per few GB of pool: `watch` does it on a thread of its own as
soon as the store registers the pool — at worker start-up, since the store starts with
the cluster, and after a store is replaced — so that no request waits for it. Until the
node's current pool is pinned the engine thread's lookups are misses (`current`), never a
stall.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from pdserve.kv_store.index import StoreIndex
from pdserve.kv_store.pool import BlockPool

log = logging.getLogger("pdserve.kv_store")


class PoolAttachment:
    """The node's pool as this worker maps it: blocks of `block_shape` and `dtype` (the
    engine's), pinned for CUDA when `pin`. Thread-safe."""

    def __init__(self, index: StoreIndex, node: str, block_shape: tuple[int, ...],
                 dtype: torch.dtype, pin: bool):
        self.index = index
        self.node = node
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.pin = pin
        self._pool: BlockPool | None = None
        self._lock = threading.Lock()  # held while mapping (and pinning) a pool
        self._refused: set[str] = set()  # pool files this worker cannot use (logged once)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def pinned(self) -> bool:
        pool = self._pool
        return pool is not None and pool.pinned

    def current(self, path: str) -> BlockPool | None:
        """The pool at `path` for the engine thread. With `pin`, None (a miss) unless it is
        already mapped and pinned: the watcher is woken to do it instead of this thread."""
        pool = self._pool
        if pool is not None and pool.path == path:
            return pool
        if self.pin and self._watcher is not None:
            self._wake.set()
            return None
        return self.get(path)

    def get(self, path: str) -> BlockPool | None:
        """The pool at `path`, mapped (and pinned) by the calling thread if need be; None if
        the file cannot be mapped or holds blocks of another shape or dtype."""
        with self._lock:
            if self._pool is not None and self._pool.path == path:
                return self._pool
            if path in self._refused:
                return None
            t0 = time.perf_counter()
            try:
                pool = BlockPool.attach(path)
            except (OSError, ValueError) as e:
                log.warning("KV store pool %s cannot be mapped: %s", path, e)
                return None  # maybe a store being replaced: asked again next time
            if pool.block_shape != self.block_shape or pool.blocks.dtype != self.dtype:
                log.warning("KV store pool %s holds %s %s blocks, this worker %s %s: not used",
                            path, pool.block_shape, pool.dtype, self.block_shape, self.dtype)
                self._refused.add(path)
                return None
            how = ""
            if self.pin:
                # A replaced pool is unpinned when its last user (a load in flight, the
                # saver) drops it, after its copies completed.
                how = " and pinned for CUDA" if pool.pin_for_cuda() else ", pageable"
            log.info("KV store pool %s: %.0f MiB mapped%s in %.2fs", path,
                     pool.num_slots * pool.block_bytes / 2**20, how, time.perf_counter() - t0)
            self._pool = pool
            return pool

    def attach_registered(self) -> BlockPool | None:
        """Map (and pin) the pool the index has registered for this node now, on the calling
        thread; None if there is none (no store, or no Redis)."""
        path = self.index.pool_path(self.node)
        return None if path is None else self.get(path)

    def watch(self, poll_s: float = 1.0) -> None:
        """Keep the node's registered pool mapped and pinned from a thread of its own (look
        every `poll_s`, or at once when a lookup found a pool it does not hold)."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, args=(poll_s,),
                                             name="kv-store-attach", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join(5)

    def _watch(self, poll_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.attach_registered()
            except Exception:  # noqa: BLE001 - keep watching; lookups miss meanwhile
                log.exception("mapping the KV store pool of node %s failed", self.node)
            self._wake.wait(poll_s)
            self._wake.clear()
