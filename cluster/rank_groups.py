"""Workers that span several processes: one Ray actor per rank, in one placement group.

A worker of a pool with `tp x pp > 1` ranks is a rank group (`engine.executor`): rank 0 is
the worker actor the router talks to (`PrefillActor` / `DecodeActor`). Its engine schedules
and, every step, broadcasts the step's inputs to the other ranks over `torch.distributed`
(gloo on CPU, NCCL on GPU): the router makes no per-step call to any rank. Every other
rank is a `FollowerActor` running `engine.executor.multiproc.run_follower`: it holds its
shard of the weights and its KV pool, executes the driver's steps, and never schedules.

Placement (`placement_plan`): one placement group per worker, so a worker's ranks are
placed together or not at all (no half-placed worker holding resources another one
waits for) and a replacement reuses the group whole.
- `pp_placement: pack` (the default): one bundle per rank (rank r in bundle r),
  `STRICT_PACK`: every rank on one node.
- `spread` / `strict_spread`: one bundle per pipeline stage holding all of that stage's
  ranks, `SPREAD` / `STRICT_SPREAD`. A bundle never spans nodes, so a stage's TP ranks
  (whose all-reduces run every layer) always share a node, while the stages (which pass
  one activation per micro-batch) go to different nodes: where Ray can (`SPREAD`, else
  they share one), or always (`STRICT_SPREAD`, else the worker does not start).

Rendezvous (`rendezvous_host`): a free port on rank 0's node, picked by a task in rank 0's
bundle and handed to every rank's constructor, so all ranks join concurrently. When every
rank landed on one node the group meets and binds on loopback, never exposed beyond the
node; when its stages landed on several nodes, rank 0 listens on its node IP (as Ray
reports it) and each rank's gloo sockets bind its own node's IP.

A worker of one rank is placed the same way (one bundle) and gets no rank group.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
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
    collective (a dead or hung rank fails the step after at most this long);
    `bind_node_ip` False means every rank is on one node and binds loopback, True that
    each rank binds its own node's IP (the group spans nodes).
    """

    init_method: str
    world_size: int
    timeout_s: float
    pp_size: int = 1
    bind_node_ip: bool = False

    _KEYS = frozenset({"init_method", "world_size", "timeout_s", "pp_size", "bind_node_ip"})

    def to_dict(self) -> dict:
        return {"init_method": self.init_method, "world_size": self.world_size,
                "timeout_s": self.timeout_s, "pp_size": self.pp_size,
                "bind_node_ip": self.bind_node_ip}

    @classmethod
    def from_dict(cls, d: dict) -> RankGroupSpec:
        if set(d) != cls._KEYS:
            raise ValueError(f"a rank group spec has {sorted(cls._KEYS)}; got {sorted(d)}")
        return cls(str(d["init_method"]), int(d["world_size"]), float(d["timeout_s"]),
                   int(d["pp_size"]), bool(d["bind_node_ip"]))

    def join(self, rank: int, device: str):
        """Join the group as `rank` (blocks until every rank joined, or `timeout_s`)."""
        from pdserve.engine.executor.group import init_rank_group

        bind = ray.util.get_node_ip_address() if self.bind_node_ip else "127.0.0.1"
        return init_rank_group(rank, self.world_size, self.init_method, device=device,
                               timeout_s=self.timeout_s, pp_size=self.pp_size, bind_host=bind)


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """The placement group of one worker: its bundles, Ray's strategy for them, and the
    bundle each rank runs in (ranks are stage-major: rank r is TP rank r % tp of stage
    r // tp)."""

    bundles: tuple[dict, ...]
    strategy: str
    bundle_of_rank: tuple[int, ...]


def placement_plan(pool: PoolSection) -> PlacementPlan:
    """Where `pool`'s ranks go (see the module docstring): one bundle a rank packed on one
    node, or one bundle a stage (its ranks' resources together) with the stages spread."""
    rank = {"CPU": pool.num_cpus, **pool.resources}
    if pool.num_gpus:
        rank["GPU"] = pool.num_gpus
    world = pool.tp * pool.pp
    if pool.pp_placement == "pack" or pool.pp == 1:
        return PlacementPlan(tuple(dict(rank) for _ in range(world)), "STRICT_PACK",
                             tuple(range(world)))
    stage = {k: v * pool.tp for k, v in rank.items()}
    strategy = "STRICT_SPREAD" if pool.pp_placement == "strict_spread" else "SPREAD"
    return PlacementPlan(tuple(dict(stage) for _ in range(pool.pp)), strategy,
                         tuple(r // pool.tp for r in range(world)))


def rendezvous_host(rank_nodes: Sequence[str], rank0_node_ip: str) -> str:
    """The host a rank group meets at, given the node each rank was placed on: loopback
    when they all share one node (nothing beyond it needs to reach the group), else rank
    0's node IP."""
    return "127.0.0.1" if len(set(rank_nodes)) == 1 else rank0_node_ip


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
    rank_nodes: tuple[str, ...] = ()  # the Ray node id each rank was placed on
    rendezvous: str = ""  # the group's init_method ("" for one rank)

    @property
    def actors(self) -> list:
        return [self.driver, *self.followers]


@ray.remote(num_cpus=0)
def _free_port(host: str) -> int:
    """A port free right now on `host` of the node this task runs on (rank 0's bundle)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@ray.remote(max_concurrency=_FOLLOWER_CONCURRENCY)
class FollowerActor:
    """Rank `rank` (> 0) of a worker: joins the group and builds its shard at construction;
    `run` then executes the driver's steps until the driver stops or the group breaks."""

    def __init__(self, config: dict, pool: str, worker_id: str, rank: int, spec: dict):
        from pdserve.engine.cpu_threads import configure_process

        cfg = ClusterConfig.model_validate(config)
        section: PoolSection = getattr(cfg, pool)
        # Same thread budget and passive OpenMP waiting as the driver rank (actors._setup);
        # before the executor's import brings torch in.
        configure_process(section.rank_threads())
        from pdserve.engine.executor.multiproc import Follower

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
                "node": ray.get_runtime_context().get_node_id(),
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
                              num_kv_heads=read_model_shape(cfg.model.name)["num_kv_heads"],
                              misroute_next=cfg.debug.misroute_rank_pushes)
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
    """Place one worker of `pool` (tp x pp ranks, `placement_plan`) and start its actors,
    in `placement` (a replacement's: the old actors are gone, their bundles free) or a new
    placement group. Returns once the placement group is placed (at most `place_timeout`,
    else TimeoutError); the driver's `ready()` answers once every rank joined and agreed on
    the model."""
    plan = placement_plan(pool)
    world = pool.tp * pool.pp
    selector = ({"bundle_label_selector": [dict(pool.node_labels)] * len(plan.bundles)}
                if pool.node_labels else {})
    pg = placement or placement_group(list(plan.bundles), strategy=plan.strategy, **selector)

    def opts(rank: int) -> dict:
        o: dict = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       placement_group=pg,
                       placement_group_bundle_index=plan.bundle_of_rank[rank])}
        if pool.resources:
            o["resources"] = dict(pool.resources)
        return o

    if world == 1:
        driver = actor_cls.options(**opts(0)).remote(config_blob, worker_id, *args)
        return WorkerGroup(worker_id, driver, pg)
    if not pg.wait(place_timeout):
        where = (f"on one node ({world} bundles of {plan.bundles[0]})"
                 if plan.strategy == "STRICT_PACK" else
                 f"as {pool.pp} stages of {plan.bundles[0]} each ({plan.strategy})")
        raise TimeoutError(f"{worker_id}: {world} ranks could not be placed {where} within "
                           f"{place_timeout:.0f}s (not enough CPUs/GPUs or nodes? see "
                           "`ray status`)")
    rank_nodes = _rank_nodes(pg, plan)
    host = rendezvous_host(rank_nodes, _node_ip(rank_nodes[0]))
    port = ray.get(_free_port.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=plan.bundle_of_rank[0])).remote(host),
        timeout=place_timeout)
    spec = RankGroupSpec(f"tcp://{_url_host(host)}:{port}", world, pool.collective_timeout_s,
                         pool.pp, bind_node_ip=len(set(rank_nodes)) > 1)
    followers = [FollowerActor.options(**opts(rank)).remote(
        config_blob, pool_name, worker_id, rank, spec.to_dict()) for rank in range(1, world)]
    runs = [f.run.remote() for f in followers]  # each starts once its rank has joined
    driver = actor_cls.options(**opts(0)).remote(config_blob, worker_id, *args,
                                                 rank_group=spec.to_dict())
    return WorkerGroup(worker_id, driver, pg, pool.tp, pool.pp, followers, runs, rank_nodes,
                       spec.init_method)


def _rank_nodes(pg: PlacementGroup, plan: PlacementPlan) -> tuple[str, ...]:
    """The node id each rank runs on (its bundle's, in the placed placement group)."""
    from ray.util import placement_group_table

    by_bundle = placement_group_table(pg)["bundles_to_node_id"]
    return tuple(by_bundle[b] for b in plan.bundle_of_rank)


def _node_ip(node_id: str) -> str:
    """The IP Ray reports for node `node_id` (what the other nodes reach it by)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise RuntimeError(f"Ray does not know node {node_id}")
