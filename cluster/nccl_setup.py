"""Pair every prefill worker with every decode worker over NCCL, once, at cluster start.

The `nccl` KV transport keeps one 2-rank communicator per (prefill, decode) pair for the
life of the cluster (kv_transfer/nccl_transport.py): per request it only reuses it. Making
one needs both processes at the same time, so it happens here, through Ray:

1. the prefill actor makes a unique id (`nccl_uid`), which comes back as plain ints;
2. both actors join with it concurrently (`nccl_connect(peer_id, uid, rank)`: prefill is
   rank 0, decode rank 1) — each call blocks until the other side has joined and the first
   (warm-up) message crossed.

Pairs are made one at a time: it is a one-off cost at start, and NCCL's setup of one
communicator already uses every link between the two GPUs. A pair whose communicator was
aborted after a timeout is made again by `reconnect_broken` (both sides replace theirs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ray

log = logging.getLogger("pdserve.cluster")


class NcclSetupError(RuntimeError):
    """A prefill/decode pair could not make its NCCL communicator."""


def _ids(handles: Sequence, timeout: float) -> list[str]:
    return [info["worker_id"] for info in
            ray.get([h.ready.remote() for h in handles], timeout=timeout)]


def connect_pair(prefill, prefill_id: str, decode, decode_id: str,
                 timeout: float = 120.0) -> None:
    """Make (or remake) the communicator between one prefill and one decode actor."""
    try:
        uid = ray.get(prefill.nccl_uid.remote(), timeout=timeout)
        ray.get([prefill.nccl_connect.remote(decode_id, uid, 0),
                 decode.nccl_connect.remote(prefill_id, uid, 1)], timeout=timeout)
    except Exception as e:
        raise NcclSetupError(
            f"NCCL communicator {prefill_id} -> {decode_id} failed: {e} (are both GPUs "
            "visible to each other, and is NCCL_SOCKET_IFNAME right on multi-node clusters?)"
        ) from e


def connect_all(prefill: Sequence, decode: Sequence, timeout: float = 120.0) -> int:
    """Connect every (prefill, decode) actor pair; returns how many pairs were made."""
    p_ids, d_ids = _ids(prefill, timeout), _ids(decode, timeout)
    for p, p_id in zip(prefill, p_ids):
        for d, d_id in zip(decode, d_ids):
            connect_pair(p, p_id, d, d_id, timeout)
            log.info("NCCL KV pair %s -> %s ready", p_id, d_id)
    return len(p_ids) * len(d_ids)


def broken_pairs(p_ids: Sequence[str], p_broken: Sequence[Sequence[str]],
                 d_ids: Sequence[str], d_broken: Sequence[Sequence[str]]
                 ) -> list[tuple[str, str]]:
    """The (prefill, decode) pairs either side reports broken, among live workers, sorted.

    `p_broken[i]` are the decode ids prefill worker `p_ids[i]` gave up on, `d_broken[j]`
    the prefill ids decode worker `d_ids[j]` gave up on. A peer that is not (or no longer)
    in the pools is skipped: there is nothing to pair it with."""
    bad = {(p, d) for p, peers in zip(p_ids, p_broken) for d in peers}
    bad |= {(p, d) for d, peers in zip(d_ids, d_broken) for p in peers}
    live_p, live_d = set(p_ids), set(d_ids)
    return sorted((p, d) for p, d in bad if p in live_p and d in live_d)


def reconnect_broken(prefill: Sequence, decode: Sequence, timeout: float = 120.0) -> int:
    """Remake every pair that either side reports broken; returns how many were remade.

    The router's health loop (`cluster.launcher`) calls it every few seconds on an nccl
    cluster: until a pair is remade, its prefill side refuses requests for that decode
    worker at once, so the router retries them on another pair.
    """
    p_ids, d_ids = _ids(prefill, timeout), _ids(decode, timeout)
    p_broken = ray.get([p.nccl_broken.remote() for p in prefill], timeout=timeout)
    d_broken = ray.get([d.nccl_broken.remote() for d in decode], timeout=timeout)
    by_p, by_d = dict(zip(p_ids, prefill)), dict(zip(d_ids, decode))
    pairs = broken_pairs(p_ids, p_broken, d_ids, d_broken)
    for p_id, d_id in pairs:
        connect_pair(by_p[p_id], p_id, by_d[d_id], d_id, timeout)
        log.info("NCCL KV pair %s -> %s remade", p_id, d_id)
    return len(pairs)
