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


def reconnect_broken(prefill: Sequence, decode: Sequence, timeout: float = 120.0) -> int:
    """Remake every pair that either side reports broken; returns how many were remade.

    Meant for a health loop: until a pair is remade, its prefill side refuses requests for
    that decode worker at once, so the router retries them on another pair.
    """
    p_ids, d_ids = _ids(prefill, timeout), _ids(decode, timeout)
    p_broken = ray.get([p.nccl_broken.remote() for p in prefill], timeout=timeout)
    d_broken = ray.get([d.nccl_broken.remote() for d in decode], timeout=timeout)
    bad = {(p_id, d_id) for p_id, peers in zip(p_ids, p_broken) for d_id in peers}
    bad |= {(p_id, d_id) for d_id, peers in zip(d_ids, d_broken) for p_id in peers}
    by_p, by_d = dict(zip(p_ids, prefill)), dict(zip(d_ids, decode))
    for p_id, d_id in sorted(bad):
        if p_id in by_p and d_id in by_d:
            connect_pair(by_p[p_id], p_id, by_d[d_id], d_id, timeout)
            log.info("NCCL KV pair %s -> %s remade", p_id, d_id)
    return len(bad)
