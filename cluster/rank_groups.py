"""Workers that span several processes: one Ray actor per rank, in one placement group.

A worker of a pool with `tp x pp > 1` ranks is a rank group (`engine.executor`): rank 0 is
the worker actor the router talks to (`PrefillActor` / `DecodeActor`). Its engine schedules
and, every step, broadcasts the step's inputs to the other ranks over `torch.distributed`
(gloo on CPU, NCCL on GPU): the router makes no per-step call to any rank. Every other
rank is a `FollowerActor` running `engine.executor.multiproc.run_follower`: it holds its
shard of the weights and its KV pool, executes the driver's steps, and never schedules.

Placement: one placement group per worker with one bundle per rank (rank r in bundle r),
`STRICT_PACK` so the ranks of a TP group share a node (their all-reduces run every layer).
The group's rendezvous address is a free port picked on that node by a task in bundle 0
(rank 0's place) and handed to every rank's constructor, so all ranks join concurrently.

A worker of one rank is placed the same way (one bundle) and gets no rank group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.cluster.config import ClusterConfig, PoolSection

# Extra threads of a follower actor beside `run`: health and KV-pool queries.
_FOLLOWER_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class RankGroupSpec:
    """How the ranks of one worker find each other (crosses Ray as a plain dict).

    Invariants: every rank of the worker gets the same spec; `init_method` is a
    `tcp://host:port` on rank 0's node, free when picked; `timeout_s` bounds every
    collective (a dead or hung rank fails the step after at most this long).
    """

    init_method: str
    world_size: int
    timeout_s: float
    pp_size: int = 1

    def to_dict(self) -> dict:
        return {"init_method": self.init_method, "world_size": self.world_size,
                "timeout_s": self.timeout_s, "pp_size": self.pp_size}

    @classmethod
    def from_dict(cls, d: dict) -> RankGroupSpec:
        if set(d) != {"init_method", "world_size", "timeout_s", "pp_size"}:
            raise ValueError(f"a rank group spec has init_method, world_size, timeout_s, "
                             f"pp_size; got {sorted(d)}")
        return cls(str(d["init_method"]), int(d["world_size"]), float(d["timeout_s"]),
                   int(d["pp_size"]))

    def join(self, rank: int, device: str):
        """Join the group as `rank` (blocks until every rank joined, or `timeout_s`)."""
        from pdserve.engine.executor.group import init_rank_group

        return init_rank_group(rank, self.world_size, self.init_method, device=device,
                               timeout_s=self.timeout_s, pp_size=self.pp_size)


@dataclass
class WorkerGroup:
    """The actors of one worker: the driver (rank 0, the router's handle) and its
    followers (ranks 1..n-1), with the placement group that holds them."""

    worker_id: str
    driver: ray.actor.ActorHandle
    placement: PlacementGroup
    tp: int = 1
    pp: int = 1
    followers: list = field(default_factory=list)
    follower_runs: list = field(default_factory=list)  # each follower's `run` result

    @property
    def actors(self) -> list:
        return [self.driver, *self.followers]


@ray.remote(num_cpus=0)
def _free_port() -> int:
    """A port free right now on the node this task runs on (bundle 0: rank 0's node)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(max_concurrency=_FOLLOWER_CONCURRENCY)
class FollowerActor:
    """Rank `rank` (> 0) of a worker: joins the group and builds its shard at construction;
    `run` then executes the driver's steps until the driver stops or the group breaks."""

    def __init__(self, config: dict, pool: str, worker_id: str, rank: int, spec: dict):
        import torch

        from pdserve.engine.executor.multiproc import Follower

        cfg = ClusterConfig.model_validate(config)
        section: PoolSection = getattr(cfg, pool)
        torch.set_num_threads(section.threads)
        self.worker_id, self.rank = worker_id, rank
        self.kv = _rank_connector(cfg, pool, rank)
        self.group = RankGroupSpec.from_dict(spec).join(rank, section.device)
        self.follower = Follower(cfg.engine_config(section), self.group, self.kv)

    def run(self) -> int:
        """Serve until the driver says stop (returns the steps executed); raises if the
        driver or another rank is lost. The group's sockets are closed either way."""
        try:
            return self.follower.run()
        finally:
            self.group.destroy()
            if self.kv is not None:
                self.kv.close()

    def health(self) -> dict:
        w = self.follower.worker
        return {"worker_id": self.worker_id, "rank": self.rank, "pid": os.getpid(),
                "steps": self.follower.steps, "kv_blocks": w.num_blocks,
                "kv_heads": w.layout.num_kv_heads if w.kv_cache is not None else 0,
                "kv_layers": w.layout.num_layers if w.kv_cache is not None else 0,
                # Reservations this rank's receiver still holds (decode ranks): what the
                # driver has not cancelled — 0 once every handoff committed or aborted.
                "kv_reservations": getattr(self.kv, "num_reservations", 0)}


def _rank_connector(cfg: ClusterConfig, pool: str, rank: int):
    """This rank's half of its worker's KV connector: a prefill rank pushes its own heads
    of its stage's layers, a decode rank (disaggregated) receives them; a colocated rank
    moves no KV."""
    from pdserve.kv_transfer.rank_connector import RankPushReceiver, RankPushSender

    if cfg.mode != "disaggregated":
        return None
    section: PoolSection = getattr(cfg, pool)
    first_layer = _first_layer(cfg, section, rank)
    if pool == "prefill":
        from pdserve.engine.loader.model_files import read_model_shape

        return RankPushSender(cfg.transport, rank % section.tp, section.tp,
                              first_layer=first_layer,
                              num_kv_heads=read_model_shape(cfg.model.name)["num_kv_heads"])
    from pdserve.cluster.actors import transfer_endpoint

    host, advertise = transfer_endpoint(section.transfer_host)
    return RankPushReceiver(cfg.transport, first_layer, host=host, advertise_host=advertise)


def _first_layer(cfg: ClusterConfig, section: PoolSection, rank: int) -> int:
    """The model layer rank `rank`'s stage starts at (ranks are stage-major:
    engine.parallel.ParallelContext)."""
    if rank < section.tp:
        return 0
    from pdserve.engine.loader.model_files import read_model_shape
    from pdserve.engine.parallel import layers_per_stage

    sizes = layers_per_stage(read_model_shape(cfg.model.name)["num_layers"], section.pp)
    return sum(sizes[:rank // section.tp])


def start_worker(actor_cls, pool: PoolSection, config_blob: dict, pool_name: str,
                 worker_id: str, *args, place_timeout: float = 600.0,
                 placement: PlacementGroup | None = None) -> WorkerGroup:
    """Place one worker of `pool` (tp x pp ranks) and start its actors, in `placement` (a
    replacement's: the old actors are gone, their bundles free) or a new placement group.
    Returns once the placement group is placed (at most `place_timeout`, else
    TimeoutError); the driver's `ready()` answers once every rank joined and agreed on the
    model."""
    world = pool.tp * pool.pp
    bundle = {"CPU": pool.num_cpus, **pool.resources}
    if pool.num_gpus:
        bundle["GPU"] = pool.num_gpus
    selector = ({"bundle_label_selector": [dict(pool.node_labels)] * world}
                if pool.node_labels else {})
    pg = placement or placement_group([dict(bundle) for _ in range(world)],
                                      strategy="STRICT_PACK", **selector)

    def opts(rank: int) -> dict:
        o: dict = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       placement_group=pg, placement_group_bundle_index=rank)}
        if pool.resources:
            o["resources"] = dict(pool.resources)
        return o

    if world == 1:
        driver = actor_cls.options(**opts(0)).remote(config_blob, worker_id, *args)
        return WorkerGroup(worker_id, driver, pg)
    # Ranks of one TP group share a node (STRICT_PACK), so loopback reaches them all and
    # the rendezvous port is never exposed beyond the node.
    try:
        port = ray.get(_free_port.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0)).remote(), timeout=place_timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"{worker_id}: {world} ranks of {bundle} each could not be placed on one node within "
            f"{place_timeout:.0f}s (not enough CPUs/GPUs there? see `ray status`)") from None
    spec = RankGroupSpec(f"tcp://127.0.0.1:{port}", world, pool.collective_timeout_s, pool.pp)
    followers = [FollowerActor.options(**opts(rank)).remote(
        config_blob, pool_name, worker_id, rank, spec.to_dict()) for rank in range(1, world)]
    runs = [f.run.remote() for f in followers]  # each starts once its rank has joined
    driver = actor_cls.options(**opts(0)).remote(config_blob, worker_id, *args,
                                                 rank_group=spec.to_dict())
    return WorkerGroup(worker_id, driver, pg, pool.tp, pool.pp, followers, runs)
