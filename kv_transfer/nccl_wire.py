"""Wire format of the `nccl` transport: the host-channel announce, the NCCL trailer, the plan.

A transfer is announced before any NCCL operation for it exists on either GPU:

    ANNOUNCE  (host channel, msgpack; kv_transfer/nccl_control.py) pair token, request id,
              compat key, layers, block bytes, destination block ids, the sink's secret
    LAYER l   (NCCL) for each run: K bytes, then V bytes (`length * block_bytes` each)
    TRAILER   (NCCL) int64[4]: magic, request key, layers sent with real data, outcome
    REPLY     (host channel, any time after the announce was read) accepted, or refused
              with a gRPC status code name, why, and whether the payload is drained

The decode side posts receives only for announces it read, so its GPU holds no pending
NCCL operation while no transfer is announced; the sender does not wait for the reply, so
the announce costs a one-way write, not a round trip, on the time to first token. The
trailer stays on NCCL, after the last layer on the same FIFO (in the last layer's group on
both sides): the event the receiver records after it completes only once every layer
landed (the GPU-side fact it needs anyway), and an abort is told in-band, after filler for
the receives already posted.

A run is a maximal stretch of the reservation whose destination block ids are consecutive,
so `pool[l, 0|1, first:first + length]` is one contiguous region on the decode side and the
receiver writes straight into it. Pure Python (no torch, no CuPy): unit-tested on CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TRAILER_LEN = 4
TRAILER_MAGIC = 0x50444B5654524C31  # "PDKVTRL1": a desynchronised stream is caught at once
HELLO_MAGIC = 0x50444B5648454C4F  # "PDKVHELO": first word on a new communicator
# Sent once at connect: large enough that NCCL sets up every channel it will use for the
# pair then, not lazily inside the first real transfer (setup blocks until the peer joins).
WARM_BYTES = 16 << 20
# NCCL calls fused into one group: every ready layer's runs go in as few launches as this
# allows (calls to one peer inside a group run in order, so grouping may differ per side).
MAX_GROUP_OPS = 256
OUTCOME_DONE = 1
OUTCOME_ABORTED = 2
_MASK63 = (1 << 63) - 1


def _hash63(data: bytes) -> int:
    """A stable, non-negative 63-bit digest (fits a signed int64 on the wire)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def request_key(request_id: str) -> int:
    """The request id as the trailer carries it: the same on every host and Python run."""
    return _hash63(b"req:" + request_id.encode())


def pair_token(uid: Sequence[int]) -> str:
    """Names one communicator on the host channel: both sides hold its NCCL unique id, and
    nobody else does, so an announce is matched to exactly the pair it will travel on."""
    return hashlib.blake2b(bytes(int(b) & 0xFF for b in uid), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Announce:
    """What the prefill side will send for one request, told before it sends any of it."""

    pair: str
    request_id: str
    compat_key: str
    num_layers: int
    block_bytes: int  # bytes of one block's K (or V) for one layer
    block_ids: tuple[int, ...]  # destination ids, in request order
    # KVSink.secret: the decode side refuses (and drains) an announce without it, leaving
    # the reservation as it was. Not in repr: it must not reach a log line.
    secret: str = field(default="", repr=False)

    def to_msg(self) -> dict[str, Any]:
        return {"op": "announce", "pair": self.pair, "request_id": self.request_id,
                "compat_key": self.compat_key, "num_layers": self.num_layers,
                "block_bytes": self.block_bytes, "block_ids": list(self.block_ids),
                "secret": self.secret}

    @classmethod
    def from_msg(cls, msg: Any) -> Announce:
        """Parse a received announce; ValueError names what is malformed."""
        want = {"op", "pair", "request_id", "compat_key", "num_layers", "block_bytes",
                "block_ids", "secret"}
        if not isinstance(msg, dict) or set(msg) != want or msg["op"] != "announce":
            what = sorted(msg) if isinstance(msg, dict) else type(msg).__name__
            raise ValueError(f"not an nccl KV announce: {what}")
        ids = msg["block_ids"]
        ints = [msg["num_layers"], msg["block_bytes"]]
        if not isinstance(ids, list) or not all(type(b) is int for b in [*ids, *ints]) or \
                not all(isinstance(msg[k], str)
                        for k in ("pair", "request_id", "compat_key", "secret")):
            raise ValueError("nccl KV announce fields have the wrong types")
        a = cls(msg["pair"], msg["request_id"], msg["compat_key"], msg["num_layers"],
                msg["block_bytes"], tuple(ids), msg["secret"])
        if not a.request_id or not a.block_ids or min(a.num_layers, a.block_bytes) < 1:
            raise ValueError(f"nccl KV announce out of range: {a.request_id!r}, "
                             f"{len(a.block_ids)} blocks, {a.num_layers} layers, "
                             f"{a.block_bytes}-byte blocks")
        return a


@dataclass(frozen=True, slots=True)
class Trailer:
    key: int
    layers_sent: int
    outcome: int

    def encode(self) -> list[int]:
        return [TRAILER_MAGIC, self.key, self.layers_sent, self.outcome]

    @classmethod
    def decode(cls, words: Sequence[int]) -> Trailer:
        if len(words) != TRAILER_LEN or words[0] != TRAILER_MAGIC:
            raise ValueError(f"not an nccl KV trailer: {list(words)[:2]}")
        return cls(int(words[1]), int(words[2]), int(words[3]))


@dataclass(frozen=True, slots=True)
class Run:
    """`length` blocks of the request from position `index`, landing at `dst_first`.

    `src_first` is the first source block when the source ids of the run are consecutive
    too (sent straight from the pool), or -1 when the sender must gather them first.
    """

    index: int
    length: int
    dst_first: int
    src_first: int = -1


def block_runs(dst_ids: Sequence[int]) -> list[Run]:
    """Maximal runs of consecutive destination ids, in request order."""
    runs: list[Run] = []
    start = 0
    for i in range(1, len(dst_ids) + 1):
        if i == len(dst_ids) or dst_ids[i] != dst_ids[i - 1] + 1:
            runs.append(Run(start, i - start, dst_ids[start]))
            start = i
    return runs


def send_plan(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[Run]:
    """The destination runs, each marked direct (consecutive sources) or gathered."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
    plan = []
    for r in block_runs(dst_ids):
        src = src_ids[r.index:r.index + r.length]
        direct = all(src[i] == src[0] + i for i in range(len(src)))
        plan.append(Run(r.index, r.length, r.dst_first, src[0] if direct else -1))
    return plan
