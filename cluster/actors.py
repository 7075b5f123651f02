"""Ray actor shells around the plain worker classes (all logic lives in the workers).

Actors are threaded (`max_concurrency`), so one actor serves many requests at once: each
call blocks a thread on the worker's engine loop, never the loop itself. Messages cross the
Ray edge as plain data (`pdserve.messages`: `to_dict` out, `from_dict` in), so Ray never
pickles one of our objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import replace

import ray

from pdserve.cluster.config import ClusterConfig
from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest

MAX_CONCURRENCY = 512


def _setup(threads: int) -> None:
    """First act of a worker process, before it imports torch (OpenMP reads its wait
    policy at load: engine/cpu_threads.py)."""
    from pdserve.engine.cpu_threads import configure_process

    configure_process(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def _as_dicts(chunks: Generator[OutputChunk, None, None]) -> Iterator[dict]:
    """A worker's chunk stream as plain data; closing it closes the worker's stream (which
    aborts the request when the router stopped reading)."""
    with closing(chunks):
        for chunk in chunks:
            yield chunk.to_dict()


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


def transfer_endpoint(transfer_host: str) -> tuple[str, str | None]:
    """(interface to bind, address to advertise or None) for `decode.transfer_host`.

    "node-ip" binds this node's Ray IP (the address the other nodes reach it by); a
    wildcard (0.0.0.0, ::) binds every interface and advertises the node's IP, since a
    wildcard is no address a prefill worker can connect to.
    """
    if transfer_host == "node-ip":
        return ray.util.get_node_ip_address(), None
    if transfer_host in ("0.0.0.0", "::", "[::]"):
        return transfer_host.strip("[]"), ray.util.get_node_ip_address()
    return transfer_host, None


def _store(cfg: ClusterConfig, secret: str):
    """This worker's KV store connector, when the cluster runs the store (the launcher put
    the index URL into the config: kv_store.redis_url, and passed the store's `secret`,
    with which it pulls from other nodes' pools)."""
    if not cfg.kv_store.enabled:
        return None
    from pdserve.kv_store.connector import StoreConnector
    from pdserve.kv_store.index import StoreIndex

    return StoreConnector(StoreIndex(cfg.kv_store.redis_url), _node(),
                          pin_lease_s=cfg.kv_store.pin_lease_seconds,
                          verify=cfg.kv_store.verify, peer_secret=secret,
                          peer_tls=cfg.tls.sender_files() if cfg.tls else None,
                          pull_timeout_s=cfg.kv_store.pull_timeout_seconds)


def _publish_cache(cfg: ClusterConfig, worker):
    """Publish `worker`'s own prefix cache to the store's index (kv_store/cache_events.py),
    when the store runs and `kv_store.cache_events` is on; returns the publisher or None.
    Subscribed before the worker takes any request, so no event is missed."""
    if not (cfg.kv_store.enabled and cfg.kv_store.cache_events):
        return None
    from pdserve.kv_store.cache_events import CachePublisher
    from pdserve.kv_store.index import StoreIndex

    publisher = CachePublisher(StoreIndex(cfg.kv_store.redis_url), worker.worker_id,
                               ttl_s=cfg.kv_store.cache_events_ttl_seconds)
    worker.engine.subscribe_cache_events(publisher.on_event)
    return publisher


def _executor(engine_config, rank_group: dict | None):
    """The driver side of a rank group (`cluster/rank_groups.py`), or None: one process."""
    if rank_group is None:
        return None
    from pdserve.cluster.rank_groups import RankGroupSpec
    from pdserve.engine.executor.multiproc import MultiprocExecutor

    group = RankGroupSpec.from_dict(rank_group).join(0, engine_config.device)
    return MultiprocExecutor(engine_config, group)


class _WorkerShell:
    """What every worker actor answers the same way; `self.worker` is the plain class."""

    worker: object
    publisher: object = None  # a CachePublisher, with the store's cache events on

    def _identity(self, role: str) -> dict:
        import torch

        lk = self.worker.engine.layout_key
        return {"worker_id": self.worker.worker_id, "role": role,
                "parallel": {"tp": lk.tp_size, "pp": lk.pp_size},
                "content_key": self.worker.engine.content_key.to_dict(),
                "layout_key": self.worker.engine.layout_key.to_dict(), "node": _node(),
                "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}

    def abort(self, request_id: str) -> bool:
        return self.worker.abort(request_id)

    def _pull(self, request: WorkerRequest) -> None:
        """Before the engine sees `request`: copy a prefix only other nodes' store pools hold
        into this node's pool (bounded by kv_store.pull_timeout_seconds; a failure is a
        miss), on this request's actor thread, so the engine's local load serves it."""
        store = self.worker.store
        if store is not None:
            store.pull_from_peers(request.all_token_ids)

    def stats(self) -> dict:
        return replace(self.worker.stats(), node=_node()).to_dict()

    def shutdown(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.worker.close()


@ray.remote(max_concurrency=MAX_CONCURRENCY)
class PrefillActor(_WorkerShell):
    def __init__(self, config: dict, worker_id: str, store_secret: str = "",
                 rank_group: dict | None = None):
        from pdserve.prefill_worker.worker import PrefillWorker

        cfg = ClusterConfig.model_validate(config)
        _setup(cfg.prefill.rank_threads())
        engine_config = cfg.engine_config(cfg.prefill)
        self.worker = PrefillWorker(
            engine_config, transport=cfg.transport, worker_id=worker_id,
            inject_transfer_failures=cfg.debug.inject_transfer_failures,
            tls=cfg.tls.sender_files() if cfg.tls and cfg.transport == "grpc" else None,
            store=_store(cfg, store_secret),
            executor=_executor(engine_config, rank_group),
        )
        self.publisher = _publish_cache(cfg, self.worker)

    def ready(self) -> dict:
        return self._identity("prefill")

    def prefill(self, request: dict, sink: dict) -> dict:
        req = WorkerRequest.from_dict(request)
        self._pull(req)
        return self.worker.prefill(req, KVSink.from_dict(sink)).to_dict()

    # ---- nccl KV transport: pairing through Ray (cluster/nccl_setup.py) ----------------------

    def nccl_uid(self) -> list[int]:
        return self.worker.sender.unique_id()

    def nccl_connect(self, peer_id: str, uid: list[int], rank: int) -> None:
        self.worker.sender.connect(peer_id, uid, rank)

    def nccl_broken(self) -> list[str]:
        return self.worker.sender.broken_peers()


@ray.remote(max_concurrency=MAX_CONCURRENCY)
class DecodeActor(_WorkerShell):
    def __init__(self, config: dict, worker_id: str, role: str, store_secret: str = "",
                 rank_group: dict | None = None):
        from pdserve.decode_worker.worker import DecodeWorker

        cfg = ClusterConfig.model_validate(config)
        _setup(cfg.decode.rank_threads())
        host, advertise = transfer_endpoint(cfg.decode.transfer_host)
        engine_config = cfg.engine_config(cfg.decode)
        self.worker = DecodeWorker(
            engine_config, transport=cfg.transport, worker_id=worker_id,
            role=role, host=host, advertise_host=advertise,
            tls=cfg.tls.receiver_files() if cfg.tls and cfg.transport == "grpc" else None,
            store=_store(cfg, store_secret),
            executor=_executor(engine_config, rank_group),
        )
        self.publisher = _publish_cache(cfg, self.worker)

    def ready(self) -> dict:
        engine = self.worker.engine
        usage = engine.usage()
        return {**self._identity(self.worker.role), "address": self.worker.receiver.address,
                "max_model_len": engine.max_model_len,
                "kv_capacity_tokens": usage.total_blocks * usage.block_size,
                "vocab_size": engine.model_config.vocab_size}

    def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int,
                lease_s: float, prompt_token_ids: list[int] | None = None) -> dict:
        return self.worker.reserve(request_id, num_prompt_tokens, max_tokens, lease_s,
                                   prompt_token_ids).to_dict()

    def renew(self, request_id: str, lease_s: float) -> bool:
        return self.worker.renew(request_id, lease_s)

    def generate_from_prefill(self, request: dict, first: dict):
        yield from _as_dicts(self.worker.generate_from_prefill(
            WorkerRequest.from_dict(request), PrefillResult.from_dict(first)))

    def generate(self, request: dict):
        req = WorkerRequest.from_dict(request)
        self._pull(req)
        yield from _as_dicts(self.worker.generate(req))

    # ---- nccl KV transport: pairing through Ray (cluster/nccl_setup.py) ----------------------

    def nccl_connect(self, peer_id: str, uid: list[int], rank: int) -> None:
        self.worker.receiver.connect(peer_id, uid, rank)

    def nccl_broken(self) -> list[str]:
        return self.worker.receiver.broken_peers()
