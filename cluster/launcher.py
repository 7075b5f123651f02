"""Start (or join) Ray, place the worker pools, wait until they are healthy, serve gRPC and
the OpenAI-compatible HTTP API.

`pdserve serve CONFIG` and `python -m pdserve.cluster serve CONFIG` (also under `ray job submit`)
both end up in `serve()`. Placement goes through `_place` only: each worker gets its own
placement group (STRICT_PACK, one bundle per rank of a tensor-parallel worker:
`cluster/rank_groups.py`), pinned with the pool's custom resources or node labels when the
YAML names them.

Ray: `ray.address` set -> join that cluster; unset -> join the cluster of the Ray job this
process runs in (RAY_ADDRESS, set by `ray job submit`), else start a private local instance.

This process is the router: it imports no torch and never opens the weights. Its tokenizer
comes from the model's metadata (`open_tokenizer`); the vocabulary size, limits and the KV
compatibility key come from the workers' `ready()` identities.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time

import ray
from ray.util.placement_group import remove_placement_group
from tqdm import tqdm

from pdserve.cluster.actors import DecodeActor, PrefillActor
from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.control import RunFile
from pdserve.cluster.kv_store_setup import KVStoreDeployment
from pdserve.cluster.local_ray import start_local_ray
from pdserve.cluster.nccl_setup import connect_all as connect_nccl_pairs
from pdserve.cluster.nccl_setup import connect_pair as connect_nccl_pair
from pdserve.cluster.nccl_setup import reconnect_broken as reconnect_nccl_pairs
from pdserve.cluster.rank_groups import WorkerGroup, start_worker
from pdserve.cluster.ray_clients import RayDecodeClient, RayPrefillClient
from pdserve.cluster.reaper import start_reaper
from pdserve.cluster.supervisor import Supervisor
from pdserve.cluster.thread_budget import with_thread_budget
from pdserve.engine.config import ContentKey
from pdserve.engine.kv_cache.keys import (
    HandshakeError,
    LayoutKey,
    check_same_content,
    handshake,
)
from pdserve.engine.loader.model_files import open_tokenizer
from pdserve.proto import pb
from pdserve.router.frontdoor import BearerAuth, FrontDoor
from pdserve.router.grpc_server import start_server
from pdserve.router.http_server import OpenAIServer, start_http_server
from pdserve.router.kv_aware_policy import CostModel, KVAwarePolicy
from pdserve.router.lifecycle import RequestLifecycle
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policy import RoutingPolicy
from pdserve.router.prefix_locator import PublishedPrefixLocator, RoutedPrefixLocator
from pdserve.router.validation import Limits
from pdserve.tls import TLSConfigError

log = logging.getLogger("pdserve.cluster")


def _kill_all(actors) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass


class ClusterStartError(RuntimeError):
    pass


class Cluster:
    """The running actors of one config, plus the router state that fronts them."""

    def __init__(self, config: ClusterConfig):
        # `threads: auto` becomes a number per pool here, so every rank (driver or
        # follower) reads the same one from the config it is given.
        local = not (config.ray.address or os.environ.get("RAY_ADDRESS"))
        config = with_thread_budget(config, local)
        log.info("compute threads per rank: prefill %d, decode %d (%s)",
                 config.prefill.threads, config.decode.threads,
                 "split of this machine's cores" if local else "the ranks' Ray CPUs")
        self.config = config
        self.connected_ray = False  # this Cluster called ray.init, so shutdown disconnects
        self.prefill_handles: list = []
        self.decode_handles: list = []
        self.placement_groups: list = []
        # worker id -> its rank actors and placement group (a replacement reuses the group)
        self.worker_groups: dict[str, WorkerGroup] = {}
        self.ready_info: list[dict] = []
        self.http_url: str | None = None  # the OpenAI HTTP API's base URL, once serving
        self.router: RequestLifecycle | None = None  # what `run_router` serves with
        self.kv_store = KVStoreDeployment(config)
        self._worker_cfg = config  # with the KV store's index URL once it runs

    # ---- Ray and actors ------------------------------------------------------------------

    def start(self, ready_timeout: float = 600.0) -> None:
        cfg = self.config
        if cfg.tls is not None:  # an unreadable file fails now, not after the workers start
            try:
                cfg.tls.router_files().server_ssl_context()
                cfg.tls.sender_files().client_ssl_context()
            except TLSConfigError as e:
                raise ClusterStartError(f"tls: {e}") from None
        if not ray.is_initialized():
            self._connect_ray()
        n_prefill = cfg.prefill.count if cfg.mode == "disaggregated" else 0
        role = "decode" if cfg.mode == "disaggregated" else "colocated"
        # Workers get the config with the index URL, when the store runs.
        self._worker_cfg = self.kv_store.start_index()
        try:
            for i in range(n_prefill):
                self.prefill_handles.append(self._start_worker(f"prefill-{i}", ready_timeout))
            for i in range(cfg.decode.count):
                self.decode_handles.append(self._start_worker(f"{role}-{i}", ready_timeout))
        except TimeoutError as e:
            raise ClusterStartError(str(e)) from None
        self._wait_ready(ready_timeout)
        try:
            self.kv_store.start_pools(self._worker_cfg, self.ready_info)
        except ValueError as e:
            raise ClusterStartError(f"refusing to start the KV store: {e}") from None
        if cfg.transport == "nccl" and self.prefill_handles:
            # One pooled communicator per (prefill, decode) pair, made before any request.
            connect_nccl_pairs(self.prefill_handles, self.decode_handles)

    def _connect_ray(self) -> None:
        cfg = self.config
        # "auto" (not the variable's value) so that Ray enables token auth for the join the
        # way it does for `ray.init()`; an explicit address needs RAY_AUTH_MODE=token.
        address = cfg.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
        if address:
            ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
        else:
            need = self._cpus_needed()
            start_local_ray(cfg.ray.node_ip_address,
                            num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 1, need + 1),
                            namespace=cfg.ray.namespace)
        self.connected_ray = True

    def _cpus_needed(self) -> float:
        cfg = self.config
        n_prefill = cfg.prefill.count if cfg.mode == "disaggregated" else 0
        return (n_prefill * cfg.prefill.num_cpus * cfg.prefill.tp * cfg.prefill.pp
                + cfg.decode.count * cfg.decode.num_cpus * cfg.decode.tp * cfg.decode.pp)

    def _start_worker(self, worker_id: str, timeout: float):
        """Start the rank actors of `worker_id` ("prefill-0", "decode-1", "colocated-0") in
        the placement group it had (a replacement) or a new one (one bundle a rank,
        `cluster/rank_groups.py`); returns the handle of its driver rank. Each bundle holds
        the pool's custom resources and is restricted to nodes with the pool's labels, so
        both kinds of pinning hold for every rank."""
        cfg = self.config
        blob = self._worker_cfg.model_dump(mode="json")
        if worker_id.startswith("prefill-"):
            actor_cls, pool, pool_name, args = (PrefillActor, cfg.prefill, "prefill",
                                                (self.kv_store.secret,))
        else:
            role = "decode" if cfg.mode == "disaggregated" else "colocated"
            actor_cls, pool, pool_name, args = (DecodeActor, cfg.decode, "decode",
                                                (role, self.kv_store.secret))
        old = self.worker_groups.get(worker_id)
        group = start_worker(actor_cls, pool, blob, pool_name, worker_id, *args,
                             place_timeout=timeout,
                             placement=old.placement if old is not None else None)
        if old is None:
            self.placement_groups.append(group.placement)
        self.worker_groups[worker_id] = group
        return group.driver

    def replace_worker(self, worker_id: str, ready_timeout: float):
        """Kill the actor of `worker_id` (dead or hung) and start a new one in its placement
        group; returns the new handle once it passed the start-up checks (ready, KV keys,
        reachability, NCCL pairs). Blocking; the supervisor runs it in a thread. On failure
        the new actor is killed and the old handle stays in the pools (it is down)."""
        handles = self.prefill_handles if worker_id.startswith("prefill-") \
            else self.decode_handles
        index = int(worker_id.rsplit("-", 1)[1])
        _kill_all(self.worker_groups[worker_id].actors)  # a hung one still holds its bundle
        new = self._start_worker(worker_id, ready_timeout)
        try:
            info = ray.get(new.ready.remote(), timeout=ready_timeout)
            before = self.ready_info
            self.ready_info = [i for i in before if i["worker_id"] != worker_id] + [info]
            try:
                self._check_keys()
                self._check_reachable()
            except ClusterStartError:
                self.ready_info = before
                raise
            if self.config.transport == "nccl" and self.prefill_handles:
                # The peers' communicators with the dead process are useless: make new
                # ones with the new process (each side replaces its pair for that peer).
                # Not exercised in CI (no GPUs there).
                pairs = ([(new, worker_id, d, f"decode-{j}")
                          for j, d in enumerate(self.decode_handles)]
                         if worker_id.startswith("prefill-") else
                         [(p, f"prefill-{j}", new, worker_id)
                          for j, p in enumerate(self.prefill_handles)])
                for p, p_id, d, d_id in pairs:
                    connect_nccl_pair(p, p_id, d, d_id, ready_timeout)
        except BaseException:
            _kill_all(self.worker_groups[worker_id].actors)
            raise
        handles[index] = new
        return new


    def _wait_ready(self, timeout: float) -> None:
        handles = [*self.prefill_handles, *self.decode_handles]
        refs = {h.ready.remote(): h for h in handles}
        pending = list(refs)
        deadline = time.monotonic() + timeout
        with tqdm(total=len(refs), desc="starting workers", unit="worker") as bar:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterStartError(
                        f"{len(pending)} of {len(refs)} workers not ready after {timeout:.0f}s "
                        "(not enough CPUs/GPUs/resources for the placement? see `ray status`)")
                done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 5.0))
                for ref in done:
                    try:
                        self.ready_info.append(ray.get(ref))
                    except Exception as e:
                        raise ClusterStartError(f"a worker failed to start: {e}") from e
                    bar.update(1)
        self._check_keys()
        self._check_reachable()

    def _check_keys(self) -> None:
        """The KV handshake, before any request: every worker serves the same content
        (weights, tokenizer, dtype), and every prefill worker can send KV to every decode
        worker in the layout each holds it (block size, TP/PP split, KV heads per rank).
        A refusal names the workers and the differing fields."""
        def keys(info: dict) -> tuple[str, ContentKey, LayoutKey]:
            return (info["worker_id"], ContentKey.from_dict(info["content_key"]),
                    LayoutKey.from_dict(info["layout_key"]))

        infos = [keys(i) for i in self.ready_info]
        prefill = [keys(i) for i in self.ready_info if i["role"] == "prefill"]
        decode = [keys(i) for i in self.ready_info if i["role"] == "decode"]
        try:
            for name, content, _ in infos[1:]:
                check_same_content(infos[0][0], infos[0][1], name, content)
            for p in prefill:
                for d in decode:
                    handshake(*p, *d, transport=self.config.transport)
        except HandshakeError as e:
            raise ClusterStartError(f"refusing to start: {e}") from None

    def _check_reachable(self) -> None:
        """Refuse a decode worker whose KV receiver listens on loopback while a prefill
        worker runs on another host: every transfer to it would fail."""
        if self.config.transport != "grpc":
            return
        prefill_ips = {i["node_ip"] for i in self.ready_info if i["role"] == "prefill"}
        for info in self.ready_info:
            if info["role"] != "decode":
                continue
            host = info["address"].rsplit(":", 1)[0].strip("[]")
            elsewhere = prefill_ips - {info["node_ip"]}
            if _is_loopback(host) and elsewhere:
                raise ClusterStartError(
                    f"{info['worker_id']} receives KV on {info['address']} (loopback) but "
                    f"prefill workers run on other hosts {sorted(elsewhere)}: set "
                    "decode.transfer_host to 'node-ip' (or an interface of its node)")

    @property
    def compat_key(self) -> str:
        """The digest of the content key every worker reported (they agree, or start
        failed): what block hashes include and transports check per transfer."""
        return ContentKey.from_dict(self.ready_info[0]["content_key"]).digest

    def vocab_size(self) -> int:
        """The model's vocabulary size as the decode (or colocated) workers loaded it."""
        return min(i["vocab_size"] for i in self.ready_info if "vocab_size" in i)

    def max_request_tokens(self) -> int:
        """The longest request (prompt + max_tokens) the router admits.

        Every decode (or colocated) worker must hold a whole request in its KV pool, which
        may be smaller than the model's context: a longer request could never be reserved,
        and its client would get UNAVAILABLE after useless retries instead of
        INVALID_ARGUMENT. Workers report in the order they became ready (prefill workers
        report no limits), so take the minimum over all of them, never one worker's report.
        """
        decoders = [i for i in self.ready_info if "max_model_len" in i]
        context = min([i["max_model_len"] for i in decoders]
                      + [self.config.model.max_model_len or 1 << 30])
        kv = min(i["kv_capacity_tokens"] for i in decoders)
        if kv < context:
            log.warning("a worker's KV pool holds %d tokens, fewer than the context length "
                        "%d: requests are limited to %d tokens (raise kv.memory_mb)",
                        kv, context, kv)
        return min(context, kv)

    def shutdown(self) -> None:
        self.kv_store.stop()
        _kill_all([a for g in self.worker_groups.values() for a in g.actors])
        for pg in self.placement_groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass
        if self.connected_ray:
            ray.shutdown()  # stops a local instance; only disconnects from a joined cluster

    # ---- router ------------------------------------------------------------------------------

    def lifecycle(self) -> RequestLifecycle:
        cfg = self.config
        prefill = [RayPrefillClient(h, f"prefill-{i}")
                   for i, h in enumerate(self.prefill_handles)]
        role = "decode" if cfg.mode == "disaggregated" else "colocated"
        decode = [RayDecodeClient(h, f"{role}-{i}") for i, h in enumerate(self.decode_handles)]
        return RequestLifecycle(
            cfg.mode, prefill, decode, self.routing_policy(),
            handoff_retries=cfg.router.handoff_retries, lease_seconds=cfg.router.lease_seconds,
            conditional_prefill_tokens=cfg.router.conditional_prefill_tokens,
            admission_timeout=cfg.router.admission_timeout,
        )

    def routing_policy(self) -> RoutingPolicy:
        """`router.policy`: least-loaded, or KV-aware over the workers' nodes with the
        store's index and the workers' KV size per token (from their layout key); own
        caches read from what the workers publish when they do (`kv_store.cache_events`)."""
        cfg = self.config
        if cfg.routing_policy != "kv_aware":
            return RoutingPolicy(cfg.kv.block_size)
        lk = LayoutKey.from_dict(self.ready_info[0]["layout_key"])
        per_token = (sum(lk.layers_per_stage) * 2 * lk.kv_heads_per_rank * lk.tp_size
                     * lk.head_dim * (4 if lk.dtype == "float32" else 2))
        store = self._worker_cfg.kv_store
        locator = (PublishedPrefixLocator(cfg.kv.block_size, store.redis_url)
                   if store.enabled and store.cache_events
                   else RoutedPrefixLocator(cfg.kv.block_size, store.redis_url))
        return KVAwarePolicy(cfg.kv.block_size, locator,
                             {i["worker_id"]: i["node"] for i in self.ready_info},
                             self.compat_key, CostModel(kv_bytes_per_token=per_token))

    def summary(self, address: str) -> str:
        n_p, n_d = len(self.prefill_handles), len(self.decode_handles)
        kind = "decode" if self.config.mode == "disaggregated" else "colocated"
        parts = ([f"{n_p} prefill worker{'s' * (n_p != 1)} ready"] if n_p else []) + [
            f"{n_d} {kind} worker{'s' * (n_d != 1)} ready"]
        return ", ".join(parts) + f", serving on {address}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", "[::]"):
        return "127.0.0.1"  # a wildcard is no address to connect to; this host answers
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _heal_nccl_pairs(cluster: Cluster, interval: float = 5.0) -> None:
    """Remake broken NCCL pairs (a communicator aborted after a transfer timeout) while the
    router serves; runs only on an nccl cluster. Blocking Ray calls go to a thread."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(reconnect_nccl_pairs, cluster.prefill_handles,
                                    cluster.decode_handles, 60.0)
        except Exception as e:  # noqa: BLE001 - retried next round; requests use other pairs
            log.warning("remaking broken NCCL pairs failed: %s", e)


async def _heal_kv_store(cluster: Cluster, metrics: RouterMetrics,
                         interval: float = 5.0) -> None:
    """Restart store actors that died (their nodes' pools are misses until then), and
    refresh the pools' figures in `/metrics`."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(cluster.kv_store.heal)
        except Exception as e:  # noqa: BLE001 - retried next round; serving goes on
            log.warning("restarting a KV store actor failed: %s", e)
        metrics.observe_store_pools(await cluster.kv_store.pool_stats())


async def run_router(cluster: Cluster, stop: asyncio.Event, on_ready=None) -> None:
    """Serve gRPC (and the OpenAI HTTP API, unless `router.http_port` is null) in front of
    a started cluster until `stop` is set. Both share one FrontDoor: the same limits,
    validation, queue, request lifecycle and metrics."""
    cfg = cluster.config
    tokenizer = open_tokenizer(cfg.model.name)  # metadata only: no weights, no digest
    limits = Limits(
        max_model_len=cluster.max_request_tokens(),
        max_tokens_limit=cfg.router.max_tokens_limit,
        max_prompt_tokens=cfg.router.max_prompt_tokens,
        vocab_size=cluster.vocab_size(), model_name=cfg.model.name,
    )
    token = os.environ.get(cfg.router.auth_token_env) if cfg.router.auth_token_env else None
    if cfg.router.auth_token_env and not token:
        raise ClusterStartError(f"router.auth_token_env names ${cfg.router.auth_token_env}, "
                                "which is not set")
    lifecycle = cluster.router = cluster.lifecycle()
    model_info = pb.ModelInfo(name=cfg.model.name, max_model_len=limits.max_model_len,
                              block_size=cfg.kv.block_size, dtype=cfg.model.dtype)
    metrics = RouterMetrics(cfg.model.name, limits.max_model_len, lifecycle.counters)
    door = FrontDoor(lifecycle, tokenizer, limits, cfg.router.max_queue,
                     cfg.router.max_request_bytes, BearerAuth(token), model_info, metrics)
    tls = cfg.tls.router_files() if cfg.tls else None
    server, port = await start_server(door, cfg.router.host, cfg.router.port, tls)
    http = None
    try:
        if cfg.router.http_port is not None:
            http, http_port = await start_http_server(
                OpenAIServer(door, metrics), cfg.router.http_host, cfg.router.http_port,
                tls.server_ssl_context() if tls else None)
            scheme = "https" if tls else "http"
            cluster.http_url = f"{scheme}://{_url_host(cfg.router.http_host)}:{http_port}"
    except BaseException:
        await server.stop(grace=None)
        raise
    # The router's stats poll, and what notices and replaces dead or hung workers.
    poller = asyncio.create_task(Supervisor(cluster, lifecycle, cfg.health, metrics).run())
    healer = (asyncio.create_task(_heal_nccl_pairs(cluster))
              if cfg.transport == "nccl" and cluster.prefill_handles else None)
    store_healer = None
    if cluster.kv_store.actors:
        lifecycle.store_pools = cluster.kv_store.pool_stats
        store_healer = asyncio.create_task(_heal_kv_store(cluster, metrics))
    address = f"{cfg.router.host}:{port}"
    msg = cluster.summary(address)
    log.info("KV content key %s (reported by every worker)", cluster.compat_key)
    log.info(msg)
    print(msg, flush=True)
    if cluster.http_url:
        msg = (f"OpenAI-compatible HTTP API on {cluster.http_url}/v1 "
               f"(health {cluster.http_url}/health, metrics {cluster.http_url}/metrics)")
        log.info(msg)
        print(msg, flush=True)
    if on_ready:
        on_ready(address)
    try:
        await stop.wait()
    finally:
        poller.cancel()
        if healer is not None:
            healer.cancel()
        if store_healer is not None:
            store_healer.cancel()
        if http is not None:
            await http.cleanup()
        await server.stop(grace=2.0)
        await lifecycle.policy.close()


def serve(config: ClusterConfig) -> int:
    """Blocking entry point of `pdserve serve`: start, serve until SIGINT/SIGTERM, clean up.
    The reaper ends whatever this process started if it dies without cleaning up."""
    start_reaper()
    # Start-up ends cleanly on Ctrl-C (KeyboardInterrupt) and on SIGTERM (ray.init installs
    # a handler that raises SystemExit): either way the `finally` below stops the cluster.
    cluster = Cluster(config)
    try:
        cluster.start()

        run_file: list[RunFile] = []

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await run_router(cluster, stop, on_ready=lambda address: run_file.append(
                RunFile(address, cluster.http_url)))

        try:
            asyncio.run(main())
        finally:
            for f in run_file:  # `pdserve stop` finds a server by this file
                f.remove()
        print("shutting down", flush=True)
        return 0
    finally:
        cluster.shutdown()
