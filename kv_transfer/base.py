"""The KV-transfer seam: what crosses between a prefill and a decode worker, and the ABCs.

A handoff is a transaction (DESIGN.md): the decode side *reserves* blocks and publishes a
`KVSink`; the prefill side opens a `SendHandle` on that sink and streams the request's KV
layer by layer while later layers still compute; the decode side *commits* once
`KVReceiver.wait` says COMPLETE, or frees its blocks on FAILED / timeout / lease expiry.

Every transport moves whole blocks of the pool layout `kv[layer, 0=K|1=V, block, slot,
kv_head, head_dim]` (engine/kv_cache/layout.py): the unit on the wire is
`pool[layer, :, blocks]`, shaped `[2, n, block_size, kv_heads, head_dim]`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pdserve.engine.parallel import kv_heads_of_rank

# KVSink lives with the other router <-> worker messages; re-exported for the transports.
from pdserve.messages import KVSink, blocks_for


class KVTransferError(RuntimeError):
    """A transfer failed: refused, cut off, timed out, or incomplete."""


class IncompatibleKVError(KVTransferError):
    """The two sides' compatibility keys differ: their KV blocks do not mean the same thing."""


class TransferStatus(enum.Enum):
    PENDING = "pending"  # reserved, not every layer has arrived yet
    COMPLETE = "complete"  # every layer's K and V for every block was written; "done" seen
    FAILED = "failed"  # refused, aborted by the sender, or cut off; no more writes happen
    UNKNOWN = "unknown"  # never expected, or forgotten by cancel/expire


def check_pool(pool: torch.Tensor) -> None:
    """Refuse a tensor that is not a KV pool in the layout contract's shape."""
    if pool.dim() != 6 or pool.shape[1] != 2:
        raise ValueError(
            "a KV pool is [layers, 2, blocks, block_size, kv_heads, head_dim], "
            f"got shape {tuple(pool.shape)}"
        )
    if not pool.is_contiguous():
        raise ValueError("the KV pool must be contiguous")


def check_block_ids(block_ids: Sequence[int], num_pool_blocks: int, num_tokens: int,
                    block_size: int, what: str, first_block: int = 0) -> None:
    """The sink invariants that need the pool: ids in range, and the count is the blocks of
    `num_tokens` tokens from block `first_block` on."""
    bad = [b for b in block_ids if not 0 <= b < num_pool_blocks]
    if bad:
        raise ValueError(f"{what} block ids {bad} are outside the pool (0..{num_pool_blocks - 1})")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"{what} block ids repeat a block: {list(block_ids)}")
    need = blocks_for(num_tokens, block_size) - first_block
    if need < 1:
        raise ValueError(f"{num_tokens} tokens fill {need + first_block} blocks of "
                         f"{block_size}: nothing is left to send from block {first_block}")
    if len(block_ids) != need:
        after = f" after the first {first_block}" if first_block else ""
        raise ValueError(f"{num_tokens} tokens need {need} blocks of {block_size}{after}, "
                         f"{what} has {len(block_ids)}")


class KVReceiver(ABC):
    """Decode side: one per decode worker, bound to that worker's pool tensor.

    Invariants:
    - Data is written only into blocks of a PENDING reservation, straight into
      `pool[layer, :, block_ids]` (no staging copy of the whole request).
    - After `cancel(request_id)` returns, no byte is written for that request again: later
      chunks are rejected, so its blocks may be freed and reused at once.
    - COMPLETE means every layer's K and V for every head of every reserved block was
      written (arrival is tracked per (layer, block, head)) and a sender's closing "done"
      came. Only then may decode read them. A closing "done" names the layer range its
      stream sent; a stream that delivered all of its heads for that range while other
      senders' heads or layers (other TP ranks, other pipeline stages) are still missing is
      acknowledged and leaves the request PENDING; a "done" whose own part is short, or
      whose range lies outside the pool, makes it FAILED.
    - The owner must `cancel` every request it stops caring about (abort, FAILED, and after
      commit), or `expire` them, or the table grows.
    """

    transport: ClassVar[str]

    @property
    @abstractmethod
    def address(self) -> str:
        """Where senders reach this receiver (goes into `KVSink.address`)."""

    @abstractmethod
    def expect(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
               deadline: float, first_block: int = 0) -> KVSink:
        """Register a reservation and return the sink to hand to the prefill side.

        `block_ids` receive the request's blocks from `first_block` on (the ones before are
        already held here); `num_tokens` counts the whole prompt (`KVSink`)."""

    @abstractmethod
    def status(self, request_id: str) -> TransferStatus:
        """The reservation's state now (UNKNOWN once forgotten)."""

    @abstractmethod
    def wait(self, request_id: str, timeout: float | None = None) -> TransferStatus:
        """Block (without spinning) until COMPLETE, FAILED, forgotten, or `timeout` passes."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Forget the reservation; waits out a write in progress for it, then none follow."""

    @abstractmethod
    def renew(self, request_id: str, deadline: float) -> bool:
        """Move a PENDING reservation's deadline to `deadline` (never earlier); False if the
        reservation is unknown (forgotten, expired) or no longer PENDING."""

    @abstractmethod
    def expire(self, now: float | None = None) -> list[str]:
        """Cancel every not-COMPLETE reservation whose deadline is before `now`; their ids."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting transfers and release the listener."""


class SendHandle(ABC):
    """Prefill side: one request's transfer in flight.

    Protocol: call `send_layer(l)` once for every layer of the sender's pool (`l` is the
    pool's index: a pipeline stage's pool holds only its stage's layers), right after the
    forward pass wrote layer `l`'s KV for the request's *last* prompt chunk (earlier
    chunked-prefill passes must not send: the blocks are not final yet); then exactly one
    of `finish` or `abort`. `finish` succeeds once the receiver acknowledged this handle's
    part (its heads of its layers), which need not complete the request.

    Invariants: `send_layer` never blocks on the network and never raises for transport
    failures (those surface in `finish`); it copies the layer's blocks out of the pool before
    returning — or orders the copy before later writes on the device stream — so the caller
    may overwrite or free the source blocks once `finish` or `abort` returned.
    """

    request_id: str

    @abstractmethod
    def send_layer(self, layer: int) -> None:
        """Snapshot layer `layer` of the blocks being sent and queue it for the wire."""

    @abstractmethod
    def finish(self, timeout: float | None = None) -> None:
        """Close the transfer and wait for the receiver's acknowledgement of every layer.

        Raises `KVTransferError` (or `IncompatibleKVError`) on refusal, failure or timeout.
        """

    @abstractmethod
    def abort(self) -> None:
        """Tell the receiver to drop the request (it marks it FAILED); does not block."""


@dataclass(frozen=True, slots=True)
class HeadRoute:
    """The KV heads one sending rank sends one receiving rank: its pool's heads
    `[first, first + count)` become the receiver's `[dst_first, dst_first + count)`.

    `layers`: the model layers `[lo, hi)` the route carries (None: all of the sender's);
    `dst_layer`: the model layer the receiving pool's layer 0 holds (a receiving pipeline
    stage's first layer; 0 when the receiver holds every layer)."""

    address: str
    first: int
    count: int
    dst_first: int
    layers: tuple[int, int] | None = None
    dst_layer: int = 0


class KVSender(ABC):
    """Prefill side: one per rank of a prefill worker, bound to that rank's pool; opens one
    handle a request.

    Invariants: `open` checks `sink.compat_key` against its own key before anything is sent
    and raises `IncompatibleKVError` on a mismatch. A sender of tensor-parallel rank
    `tp_rank` of `tp_size` holds the model's KV heads `[tp_rank * h, (tp_rank + 1) * h)`
    (h = its pool's heads; `num_kv_heads` the model's count, by default `tp_size * h`) and
    sends each receiving rank of the sink exactly the heads both hold (`routes`), never
    another rank's: no rank gathers the others' KV. When TP exceeds the model's KV-head
    count, each head is replicated on `tp_size // num_kv_heads` ranks
    (`engine.parallel.kv_heads_of_rank`), on either side: a receiving rank gets each of its
    heads from exactly one replica, so a sending rank may have no route at all (its handle
    then has nothing to send and finishes at once).

    A sender of a pipeline stage holds the model's layers `[first_layer, first_layer + L)`
    (L = its pool's layers; pool layer j is model layer `first_layer + j`). `send_layer`
    takes the pool's layer index; on the wire a layer is the receiving pool's index, which
    is the model's (receivers hold every layer: one stage). Its handles close with the
    range they sent, so the receiver completes the request only once every stage's range
    arrived (`BlockReceiver.finish`). A transport that cannot do this refuses
    `first_layer != 0` at `open`.
    """

    transport: ClassVar[str]

    def __init__(self, pool: torch.Tensor, compat_key: str, tp_rank: int = 0,
                 tp_size: int = 1, first_layer: int = 0,
                 num_kv_heads: int | None = None) -> None:
        check_pool(pool)
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tensor-parallel rank {tp_rank} outside 0..{tp_size - 1}")
        if first_layer < 0:
            raise ValueError(f"first layer {first_layer} is negative")
        self.pool = pool
        self.compat_key = compat_key
        self.tp_size = tp_size
        self.total_heads = num_kv_heads or tp_size * pool.shape[4]
        self.first_head, count = kv_heads_of_rank(self.total_heads, tp_size, tp_rank)
        if count != pool.shape[4]:
            raise ValueError(f"rank {tp_rank} of TP {tp_size} over {self.total_heads} KV heads "
                             f"holds {count} of them, its pool {pool.shape[4]}")
        # Ranks holding the same replicated head (TP beyond the head count): `replica` of
        # `replicas`; only one replica sends a head to any one receiving rank.
        self.replicas = max(1, tp_size // self.total_heads)
        self.replica = tp_rank % self.replicas
        self.first_layer = first_layer

    def routes(self, sink: KVSink) -> list[HeadRoute]:
        """Where this rank's heads and layers go: one route per receiving rank that holds
        any of both (`KVSink.rank_addresses`, `rank_layers`). ValueError if the receiving
        side's ranks do not form equal stages or cannot split the heads evenly."""
        addresses = sink.rank_addresses or (sink.address,)
        firsts = sink.rank_layers or (0,) * len(addresses)
        stages = sorted(set(firsts))
        d_tp = len(addresses) // len(stages)
        if len(addresses) % len(stages) or any(
                f != stages[j // d_tp] for j, f in enumerate(firsts)):
            raise ValueError(f"request {sink.request_id}: the decode worker's ranks start "
                             f"at layers {list(firsts)}: not equal stages in rank order")
        if self.total_heads % d_tp and d_tp % self.total_heads:
            raise ValueError(f"request {sink.request_id}: {self.total_heads} KV heads do not "
                             f"split over the decode worker's {d_tp} ranks")
        mine = (self.first_head, self.first_head + self.pool.shape[4])
        my_layers = (self.first_layer, self.first_layer + self.pool.shape[0])
        out = []
        for j, address in enumerate(addresses):
            stage, t = divmod(j, d_tp)
            first, count = kv_heads_of_rank(self.total_heads, d_tp, t)
            lo, hi = max(mine[0], first), min(mine[1], first + count)
            # A replicated head reaches each receiving rank from one of its replicas,
            # spread over them by receiving rank.
            if lo >= hi or t % self.replicas != self.replica:
                continue
            if len(stages) == 1:  # the receiver holds every layer
                out.append(HeadRoute(address, lo - mine[0], hi - lo, lo - first))
                continue
            end = stages[stage + 1] if stage + 1 < len(stages) else my_layers[1]
            l_lo, l_hi = max(my_layers[0], stages[stage]), min(my_layers[1], end)
            if l_lo < l_hi:
                out.append(HeadRoute(address, lo - mine[0], hi - lo, lo - first,
                                     (l_lo, l_hi), stages[stage]))
        return out

    @abstractmethod
    def open(self, sink: KVSink, src_block_ids: Sequence[int]) -> SendHandle:
        """Start a transfer of the request into `sink.block_ids`.

        `src_block_ids` are the request's blocks in this pool, all of them, in order; only
        those from `sink.first_block` on are sent (`blocks_to_send`)."""

    def close(self) -> None:  # noqa: B027 (a no-op for transports that hold nothing)
        """Release pooled connections (handles still open may fail)."""

    def check_sink(self, sink: KVSink, src_block_ids: Sequence[int]) -> None:
        """Validate a sink against this sender (host-side checks only: no device work, so
        `open` never waits for the forward pass queued on the caller's stream)."""
        if sink.compat_key != self.compat_key:
            raise IncompatibleKVError(
                f"request {sink.request_id}: decode side has KV compatibility key "
                f"{sink.compat_key!r}, this prefill worker has {self.compat_key!r}"
            )
        if sink.transport != self.transport:
            raise ValueError(f"sink is for transport {sink.transport!r}, not {self.transport!r}")
        if len(src_block_ids) != sink.first_block + len(sink.block_ids):
            raise ValueError(
                f"request {sink.request_id}: {len(src_block_ids)} source blocks for "
                f"{len(sink.block_ids)} sink blocks from block {sink.first_block}"
            )
        check_block_ids(src_block_ids, self.pool.shape[2], sink.num_tokens, self.pool.shape[3],
                        "source")

    @staticmethod
    def blocks_to_send(sink: KVSink, src_block_ids: Sequence[int]) -> list[int]:
        """The source blocks that go into `sink.block_ids`, pairwise: those from
        `sink.first_block` on (the receiver holds the ones before)."""
        return list(src_block_ids[sink.first_block:])

    def source_index(self, src_block_ids: Sequence[int]) -> torch.Tensor:
        """The source block ids as an index tensor on the pool's device (for transports that
        gather blocks with torch ops; on a GPU this copy waits for the caller's stream)."""
        return torch.tensor(list(src_block_ids), dtype=torch.long, device=self.pool.device)


class FanOutHandle(SendHandle):
    """One request's transfer to several receiving ranks: one handle per route, driven
    together. `finish` waits for every part and raises the first failure after all ended."""

    def __init__(self, request_id: str, parts: Sequence[SendHandle]) -> None:
        self.request_id = request_id
        self.parts = list(parts)

    def send_layer(self, layer: int) -> None:
        for part in self.parts:
            part.send_layer(layer)

    def finish(self, timeout: float | None = None) -> None:
        errors = []
        for part in self.parts:
            try:
                part.finish(timeout)
            except KVTransferError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def abort(self) -> None:
        for part in self.parts:
            part.abort()


class LayerTracker:
    """Sender-side bookkeeping shared by handles: each layer sent once, then closed once."""

    def __init__(self, request_id: str, num_layers: int) -> None:
        self.request_id = request_id
        self.num_layers = num_layers
        self.sent: set[int] = set()
        self.closed = False

    def claim(self, layer: int) -> None:
        if self.closed:
            raise RuntimeError(f"request {self.request_id}: send_layer after finish/abort")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self.num_layers - 1}")
        if layer in self.sent:
            raise ValueError(f"request {self.request_id}: layer {layer} sent twice")
        self.sent.add(layer)

    def close(self) -> None:
        if self.closed:
            raise RuntimeError(f"request {self.request_id}: finish/abort called twice")
        self.closed = True

    def missing(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if layer not in self.sent]
