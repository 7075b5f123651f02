"""Wire format of the `nccl` transport: fixed int64 headers and the block-run plan.

Both sides of one (prefill, decode) communicator read the same FIFO byte stream, so every
message size must be known to the receiver before it posts the receive. Per request:

    HEADER  int64[8]   magic, request key, blocks, layers, runs, block bytes, compat hash,
                       block-ids hash
    RUNS    int64[runs]  length of each run of consecutive destination blocks
    LAYER l  for each run: K bytes, then V bytes (`length * block_bytes` each), one group
    TRAILER int64[4]   magic, request key, layers sent with real data, outcome

A run is a maximal stretch of the reservation whose destination block ids are consecutive,
so `pool[l, 0|1, first:first + length]` is one contiguous region on the decode side and the
receiver writes straight into it. Pure Python (no torch, no CuPy): unit-tested on CPU.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

HEADER_LEN = 8
TRAILER_LEN = 4
HEADER_MAGIC = 0x50444B5648445231  # "PDKVHDR1": a desynchronised stream is caught at once
TRAILER_MAGIC = 0x50444B5654524C31  # "PDKVTRL1"
HELLO_MAGIC = 0x50444B5648454C4F  # "PDKVHELO": first word on a new communicator
# Sent once at connect: large enough that NCCL sets up every channel it will use for the
# pair then, not lazily inside the first real transfer (setup blocks until the peer joins).
WARM_BYTES = 16 << 20
OUTCOME_DONE = 1
OUTCOME_ABORTED = 2
_MASK63 = (1 << 63) - 1


def _hash63(data: bytes) -> int:
    """A stable, non-negative 63-bit digest (fits a signed int64 on the wire)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def request_key(request_id: str) -> int:
    """The request id as it travels: the same on every host and Python run (no `hash()`)."""
    return _hash63(b"req:" + request_id.encode())


def compat_hash(compat_key: str) -> int:
    return _hash63(b"compat:" + compat_key.encode())


def blocks_hash(block_ids: Sequence[int]) -> int:
    """Digest of the destination ids, so a header is matched to its exact reservation."""
    return _hash63(struct.pack(f"<{len(block_ids)}q", *block_ids))


@dataclass(frozen=True, slots=True)
class Header:
    key: int
    num_blocks: int
    num_layers: int
    num_runs: int
    block_bytes: int  # bytes of one block's K (or V) for one layer
    compat: int
    blocks: int

    def encode(self) -> list[int]:
        return [HEADER_MAGIC, self.key, self.num_blocks, self.num_layers, self.num_runs,
                self.block_bytes, self.compat, self.blocks]

    @classmethod
    def decode(cls, words: Sequence[int]) -> Header:
        """Parse a received header; raises ValueError when the stream is out of step."""
        if len(words) != HEADER_LEN or words[0] != HEADER_MAGIC:
            raise ValueError(f"not an nccl KV header: {list(words)[:2]}")
        h = cls(*(int(w) for w in words[1:]))
        if min(h.num_blocks, h.num_layers, h.num_runs, h.block_bytes) < 1 or \
                h.num_runs > h.num_blocks:
            raise ValueError(f"nccl KV header out of range: {h}")
        return h


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


def check_runs(lengths: Sequence[int], header: Header) -> None:
    """Validate a RUNS message against its header before draining by it."""
    if len(lengths) != header.num_runs or min(lengths, default=0) < 1 or \
            sum(lengths) != header.num_blocks:
        raise ValueError(f"run lengths {list(lengths)[:8]} do not add up to the header {header}")
