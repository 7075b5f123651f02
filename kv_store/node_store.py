"""The store process of one node: it owns the node's block pool file and keeps the pool
registered in the index (a lease it refreshes; re-registering after Redis restarts).

Workers on the node are not served by it: they map the file and move blocks themselves,
with the index's scripts deciding slots (kv_store/index.py). Workers on other nodes are:
given the cluster's store secret, it serves reads of the pool over gRPC
(kv_store/peer_service.py) and registers that address in the index with the pool. When
this process dies its lease runs out and the node's pool becomes a miss; a new store
process makes a new file.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Sequence

from pdserve.kv_store.index import PoolStats, StoreIndex
from pdserve.kv_store.pool import BlockPool
from pdserve.tls import TLSFiles

log = logging.getLogger("pdserve.kv_store")


class NodeStore:
    """Creates `num_slots` blocks of `block_shape` in `shm_dir` and registers them for
    `node`. `lease_s`: how long the pool stays findable after this process stops beating.
    With `peer_secret`, serves reads of the pool to other nodes on `peer_host` (advertised
    as `peer_advertise` when set; TLS with `tls`)."""

    def __init__(self, index: StoreIndex, node: str, num_slots: int,
                 block_shape: Sequence[int], dtype: str, shm_dir: str = "/dev/shm",
                 lease_s: float = 2.0, peer_secret: str = "", peer_host: str = "127.0.0.1",
                 peer_advertise: str | None = None, tls: TLSFiles | None = None,
                 verify: str = "header", pin_lease_s: float = 30.0):
        self.index = index
        self.node = node
        self.lease_ms = int(lease_s * 1000)
        name = f"pdserve-kv-{_safe(node)[:16]}-{secrets.token_hex(4)}"
        self.path = os.path.join(shm_dir, name)
        self.pool = BlockPool.create(self.path, num_slots, block_shape, dtype)
        self.service = None
        if peer_secret:
            from pdserve.kv_store.peer_service import PeerReadService

            try:
                self.service = PeerReadService(index, node, self.pool, peer_secret,
                                               host=peer_host, advertise_host=peer_advertise,
                                               tls=tls, verify=verify,
                                               pin_lease_s=pin_lease_s)
            except BaseException:
                self.pool.close()
                os.unlink(self.path)
                raise
        self.peer_address = self.service.address if self.service is not None else None
        self.registered = index.register_pool(node, self.path, num_slots, self.lease_ms,
                                              self.peer_address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="kv-store-lease", daemon=True)
        self._thread.start()
        log.info("KV store pool for node %s: %d blocks x %.2f MiB at %s", node, num_slots,
                 self.pool.block_bytes / 2**20, self.path)

    @property
    def capacity_blocks(self) -> int:
        return self.pool.num_slots

    def stats(self) -> PoolStats | None:
        return self.index.pool_stats(self.node)

    def close(self) -> None:
        """Unregister the pool and remove its file (workers' mappings stay valid until they
        drop them, but nothing finds a block in it any more)."""
        self._stop.set()
        self._thread.join(2)
        if self.service is not None:
            self.service.close()
        self.index.unregister_pool(self.node, self.path)
        self.pool.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        period = self.lease_ms / 4000
        while not self._stop.wait(period):
            state = self.index.heartbeat(self.node, self.path, self.lease_ms)
            if state == "unregistered":
                # Redis restarted empty: every slot is free again; stale slot headers are
                # never read, since only slots written and committed after this are indexed.
                self.registered = self.index.register_pool(
                    self.node, self.path, self.pool.num_slots, self.lease_ms,
                    self.peer_address)
                if self.registered:
                    log.warning("KV store pool for node %s re-registered", self.node)


def _safe(node: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in node)
