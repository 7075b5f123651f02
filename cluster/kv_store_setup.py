"""Starting the global KV store for a cluster (kv_store/): the Redis index (a private
redis-server on loopback when `kv_store.redis_url` is unset) and one store actor per node
that runs workers, owning that node's shared-memory block pool.

Order: `start_index` before the workers (they get the index URL in their config), then
`start_pools` once the workers reported their nodes and KV layout; `stop` in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pdserve.cluster.config import ClusterConfig
from pdserve.engine.kv_cache.keys import LayoutKey
from pdserve.messages import StorePoolStats

log = logging.getLogger("pdserve.cluster")


@ray.remote(num_cpus=0)
class KVStoreActor:
    """The store process of one node (a thin shell around `kv_store.NodeStore`)."""

    def __init__(self, config: dict, node: str, block_shape: list[int], dtype: str,
                 peer_secret: str = ""):
        from pdserve.cluster.actors import transfer_endpoint
        from pdserve.kv_store.index import StoreIndex
        from pdserve.kv_store.node_store import NodeStore

        full = ClusterConfig.model_validate(config)
        cfg = full.kv_store
        # Reads from other nodes bind where the decode workers' KV receivers do
        # (decode.transfer_host: loopback unless configured), with the same TLS.
        host, advertise = transfer_endpoint(full.decode.transfer_host)
        block_bytes = 4 if dtype == "float32" else 2
        for d in block_shape:
            block_bytes *= d
        slots = max(1, (cfg.pool_mb << 20) // block_bytes)
        self.block_bytes = block_bytes
        self.store = NodeStore(StoreIndex(cfg.redis_url), node, slots, block_shape, dtype,
                               shm_dir=cfg.shm_dir, lease_s=cfg.store_lease_seconds,
                               peer_secret=peer_secret, peer_host=host,
                               peer_advertise=advertise,
                               tls=full.tls.receiver_files() if full.tls else None,
                               verify=cfg.verify, pin_lease_s=cfg.pin_lease_seconds)

    def stats(self) -> dict:
        """`StorePoolStats` as plain data."""
        s = self.store.stats()
        figures = {} if s is None else {
            "indexed": True, "capacity_blocks": s.capacity_blocks,
            "used_blocks": s.used_blocks, "pinned_blocks": s.pinned_blocks,
            "evictions": s.evictions, "puts": s.puts}
        return StorePoolStats(self.store.node, self.store.path, block_bytes=self.block_bytes,
                              **figures).to_dict()

    def close(self) -> None:
        self.store.close()


class KVStoreDeployment:
    """The store's parts one cluster started (and so stops). `secret` admits reads of one
    node's pool by workers on others (kv_store/peer_service.py): generated here, at start,
    and handed to the store actors and the workers as Ray actor arguments, never a file."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.secret = secrets.token_urlsafe(32) if config.kv_store.enabled else ""
        self.redis = None  # a RedisServer this process started
        self.actors: dict[str, object] = {}  # node id -> KVStoreActor
        self.paths: list[str] = []  # the pool files they made

    def start_index(self) -> ClusterConfig:
        """Start Redis if the config names none; returns the config the workers get."""
        cfg = self.config
        if not cfg.kv_store.enabled or cfg.kv_store.redis_url:
            return cfg
        from pdserve.kv_store.redis_server import RedisServer

        self.redis = RedisServer().start()
        log.info("KV store index: private redis-server on 127.0.0.1:%d", self.redis.port)
        return cfg.model_copy(update={"kv_store": cfg.kv_store.model_copy(
            update={"redis_url": self.redis.url})})

    def start_pools(self, config: ClusterConfig, ready_info: list[dict]) -> None:
        """One store actor on every node that runs a worker, sized for the workers' blocks."""
        if not config.kv_store.enabled:
            return
        layouts = {LayoutKey.from_dict(i["layout_key"]) for i in ready_info}
        if len(layouts) != 1:
            raise ValueError("kv_store needs every worker to hold KV in one layout, got "
                             f"{sorted(map(str, layouts))}")
        (lk,) = layouts
        if lk.tp_size != 1 or lk.pp_size != 1:
            raise ValueError("kv_store supports tensor/pipeline parallel size 1 only so far")
        self._shape = [sum(lk.layers_per_stage), 2, lk.block_size, lk.kv_heads_per_rank,
                       lk.head_dim]
        self._dtype = lk.dtype
        self._blob = config.model_dump(mode="json")
        for node in sorted({i["node"] for i in ready_info}):
            self._start_actor(node)
        self.paths = [s["path"] for s in self.stats(timeout=60)]

    def heal(self, timeout: float = 10) -> list[str]:
        """Replace store actors that died (their nodes' pools are misses meanwhile); returns
        the nodes whose store was restarted. Blocking: call it off the event loop."""
        restarted = []
        for node, actor in list(self.actors.items()):
            try:
                ray.get(actor.stats.remote(), timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                continue  # busy, not dead
            except ray.exceptions.RayActorError:
                log.warning("KV store actor on node %s died; starting a new one", node)
                self._start_actor(node)
                self.paths.append(ray.get(self.actors[node].stats.remote(),
                                          timeout=60)["path"])
                restarted.append(node)
        return restarted

    def _start_actor(self, node: str) -> None:
        self.actors[node] = KVStoreActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(self._blob, node, self._shape, self._dtype, self.secret)

    def stats(self, timeout: float = 10) -> list[dict]:
        """Each node pool's path, capacity, use, pins, evictions and puts (blocking)."""
        return ray.get([a.stats.remote() for a in self.actors.values()], timeout=timeout)

    async def pool_stats(self, timeout: float = 5) -> list[StorePoolStats]:
        """`stats` for the router's event loop: every node's pool, a store process that is
        dead or does not answer shown as not indexed (nothing known) instead of failing."""
        async def one(node: str, actor) -> StorePoolStats:
            try:
                return StorePoolStats.from_dict(
                    await asyncio.wait_for(actor.stats.remote(), timeout))
            except Exception as e:  # noqa: BLE001 - dead or hung: shown, others still shown
                log.warning("stats of the KV store on node %s failed: %s", node, e)
                return StorePoolStats(node, "")

        return list(await asyncio.gather(*(one(n, a) for n, a in self.actors.items())))

    def stop(self) -> None:
        """Close the store actors (each removes its pool file) and the private Redis."""
        for actor in self.actors.values() if ray.is_initialized() else ():
            try:
                ray.get(actor.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - already dead: its lease runs out
                pass
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        self.actors.clear()
        for path in self.paths:  # a store actor that was killed left its file (this node's)
            if os.path.exists(path):
                os.unlink(path)
        self.paths = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
