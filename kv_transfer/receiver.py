"""Reservation bookkeeping every receiver shares; transports only feed it chunks.

Locking: `_cond` (the receiver lock) guards the table and wakes waiters; each reservation's
own `lock` is held across a write into its blocks. State changes that stop writes (cancel,
FAILED) take the reservation lock first, so they wait out a write in progress and no write
can land in blocks after the caller was told they are free. Order: reservation lock, then
receiver lock — never the reverse.

Admission: `expect` issues each reservation a random secret (in its `KVSink`); every
transport-side call (`begin`, `write`, `finish`, `sender_abort`) names it and is refused
with PERMISSION_DENIED, before the reservation is looked at any further, when it differs
(constant-time compare). A refused chunk changes nothing: knowing a request id is not
enough to write into, complete or fail its reservation.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pdserve.kv_transfer.base import (
    IncompatibleKVError,
    KVReceiver,
    KVSink,
    KVTransferError,
    TransferStatus,
    check_block_ids,
    check_pool,
)


class ChunkRejected(KVTransferError):
    """A chunk refused before anything was written. `code` is a gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Reservation:
    block_ids: tuple[int, ...]  # decode pool ids, in the request's block order
    num_tokens: int
    deadline: float
    num_layers: int
    secret: bytes  # KVSink.secret, encoded: what every chunk must carry
    state: TransferStatus = TransferStatus.PENDING
    forgotten: bool = False
    # received[l][i * heads + h]: head h of block i arrived for layer l (a repeat is not
    # counted twice). Per head, because tensor-parallel senders each send their heads.
    received: list[bytearray] = field(default_factory=list)
    layers_done: int = 0
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    # `block_ids` on the pool's device, made by the first chunk written. Not at reservation:
    # a host list copied to a GPU waits for the work already queued on the copying thread's
    # stream (a decode step, milliseconds), and transports that write the pool themselves
    # (nccl) never need it.
    device_ids: torch.Tensor | None = None


def secret_matches(res: _Reservation, secret: object) -> bool:
    """Whether `secret` is the reservation's, compared in constant time."""
    try:
        return hmac.compare_digest(res.secret, secret.encode())
    except (AttributeError, UnicodeError):  # not text: no secret at all
        return False


class BlockReceiver(KVReceiver):
    """A `KVReceiver` minus the listener: validates chunks and writes them into the pool."""

    def __init__(self, pool: torch.Tensor, compat_key: str) -> None:
        check_pool(pool)
        self.pool = pool
        self.compat_key = compat_key
        self.dtype_name = str(pool.dtype).removeprefix("torch.")
        self._table: dict[str, _Reservation] = {}
        self._cond = threading.Condition()
        self.chunks_written = 0  # for tests and metrics: how many data chunks landed

    # ---- owner (decode worker) side -------------------------------------------------------

    def expect(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
               deadline: float, first_block: int = 0, secret: str | None = None) -> KVSink:
        """Reserve `block_ids` for `request_id`'s KV; the sink carries a fresh secret, or
        `secret` (a follower rank's part of a reservation its driver rank made admits the
        driver's secret, since the senders hold only the driver's sink)."""
        # 256 random bits, URL-safe text (it crosses Ray calls as JSON and gRPC as a string).
        secret = secret or secrets.token_urlsafe(32)
        sink = KVSink(self.transport, self.address, request_id, tuple(int(b) for b in block_ids),
                      num_tokens, self.compat_key, float(deadline), int(first_block),
                      secret=secret)
        check_block_ids(sink.block_ids, self.pool.shape[2], num_tokens, self.pool.shape[3],
                        "reserved", sink.first_block)
        num_layers = self.pool.shape[0]
        res = _Reservation(
            block_ids=sink.block_ids,
            num_tokens=num_tokens, deadline=sink.deadline, num_layers=num_layers,
            secret=secret.encode(),
            received=[bytearray(len(sink.block_ids) * self.pool.shape[4])
                      for _ in range(num_layers)],
        )
        with self._cond:
            if request_id in self._table:
                raise ValueError(f"request {request_id} already has a reservation")
            self._table[request_id] = res
        return sink

    def status(self, request_id: str) -> TransferStatus:
        with self._cond:
            res = self._table.get(request_id)
            return TransferStatus.UNKNOWN if res is None else res.state

    def error(self, request_id: str) -> str:
        """Why a FAILED request failed ("" otherwise)."""
        with self._cond:
            res = self._table.get(request_id)
            return "" if res is None else res.error

    def wait(self, request_id: str, timeout: float | None = None) -> TransferStatus:
        with self._cond:
            self._cond.wait_for(
                lambda: self._state(request_id) is not TransferStatus.PENDING, timeout
            )
            return self._state(request_id)

    def cancel(self, request_id: str) -> None:
        with self._cond:
            res = self._table.pop(request_id, None)
        if res is None:
            return
        with res.lock:  # waits for a write in progress; later writes see `forgotten`
            res.forgotten = True
        self._notify()

    def renew(self, request_id: str, deadline: float) -> bool:
        with self._cond:
            res = self._table.get(request_id)
            if res is None or res.state is not TransferStatus.PENDING:
                return False
            res.deadline = max(res.deadline, deadline)
            return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._cond:
            late = [rid for rid, r in self._table.items()
                    if r.deadline < now and r.state is not TransferStatus.COMPLETE]
        for rid in late:
            self.cancel(rid)
        return late

    # ---- transport side ------------------------------------------------------------------

    def begin(self, request_id: str, compat_key: str, *, secret: str) -> None:
        """The first message of a transfer: the secret must be the reservation's, the request
        pending and the keys equal (a key mismatch from the rightful sender FAILs it)."""
        res = self.admit(request_id, secret)
        if compat_key != self.compat_key:
            msg = (f"request {request_id}: sender KV compatibility key {compat_key!r} "
                   f"differs from this decode worker's {self.compat_key!r}")
            self.fail(request_id, msg)
            raise ChunkRejected("FAILED_PRECONDITION", msg)
        if res.state is not TransferStatus.PENDING:
            raise ChunkRejected("ABORTED", f"request {request_id} is {res.state.value}")

    def write(self, request_id: str, layer: int, first_block: int, data: torch.Tensor,
              first_head: int = 0, *, secret: str) -> None:
        """Validate one chunk `[2, n, block_size, h, head_dim]` and write it in place.

        `first_block` indexes the reservation's own blocks (0 = the sink's first block,
        whatever the sink's `first_block` in the request); the chunk holds this pool's heads
        `[first_head, first_head + h)` (all of them unless a tensor-parallel sender split
        them)."""
        res = self.admit(request_id, secret)
        n = data.shape[1] if data.dim() == 5 else 0
        h = data.shape[3] if data.dim() == 5 else 0
        heads = self.pool.shape[4]
        want = (2, n, self.pool.shape[3], h, self.pool.shape[5])
        if data.dim() != 5 or tuple(data.shape) != want or n < 1 or h < 1 \
                or not 0 <= first_head <= heads - h:
            raise ChunkRejected("INVALID_ARGUMENT",
                                f"request {request_id}: chunk shape {tuple(data.shape)} from "
                                f"head {first_head}, expected (2, n>=1, {self.pool.shape[3]}, "
                                f"h>=1, {self.pool.shape[5]}) within this pool's {heads} heads")
        if data.dtype != self.pool.dtype:
            raise ChunkRejected("INVALID_ARGUMENT",
                                f"request {request_id}: chunk dtype {data.dtype}, pool is "
                                f"{self.pool.dtype}")
        if not 0 <= layer < res.num_layers:
            raise ChunkRejected("INVALID_ARGUMENT",
                                f"request {request_id}: layer {layer} outside "
                                f"0..{res.num_layers - 1}")
        nblocks = len(res.block_ids)
        if first_block < 0 or first_block + n > nblocks:
            raise ChunkRejected("INVALID_ARGUMENT",
                                f"request {request_id}: blocks {first_block}..{first_block + n - 1}"
                                f" outside the reservation's 0..{nblocks - 1}")
        with res.lock:
            if res.forgotten:
                raise ChunkRejected("NOT_FOUND", f"request {request_id} was cancelled")
            if res.state is not TransferStatus.PENDING:
                raise ChunkRejected("ABORTED", f"request {request_id} is {res.state.value}")
            if res.device_ids is None:
                res.device_ids = torch.tensor(res.block_ids, dtype=torch.long,
                                              device=self.pool.device)
            dst = res.device_ids[first_block:first_block + n]
            # index_copy_ on the basic-indexed view writes into the pool storage itself.
            target = self.pool[layer]
            if h != heads:
                target = target[..., first_head:first_head + h, :]
            target.index_copy_(1, dst, data.to(self.pool.device))
            seen = res.received[layer]
            fresh = seen.count(0)
            for b in range(first_block, first_block + n):
                seen[b * heads + first_head:b * heads + first_head + h] = b"\x01" * h
            if fresh and not seen.count(0):
                res.layers_done += 1
        with self._cond:
            self.chunks_written += 1

    def finish(self, request_id: str, num_layers: int, part_complete: bool = False, *,
               secret: str, first_layer: int = 0) -> TransferStatus:
        """A sender's closing message: it sent layers `[first_layer, first_layer +
        num_layers)` of this pool (all of them unless the sender is one pipeline stage).

        COMPLETE once every (layer, block, head) of the reservation arrived — whichever
        stream closes last. Otherwise it stays PENDING, and the sender is told its part
        arrived, only if `part_complete` (the stream wrote every block of its heads for
        exactly that layer range: the other tensor-parallel ranks or pipeline stages have
        yet to finish theirs) and the range lies within the pool; else FAILED."""
        res = self.admit(request_id, secret)
        in_pool = num_layers >= 1 and 0 <= first_layer <= res.num_layers - num_layers
        with res.lock:
            if res.forgotten:
                raise ChunkRejected("NOT_FOUND", f"request {request_id} was cancelled")
            if res.state is TransferStatus.PENDING and in_pool:
                if res.layers_done == res.num_layers:
                    if self.pool.is_cuda:  # writes were queued on the stream; make them visible
                        torch.cuda.current_stream(self.pool.device).synchronize()
                    res.state = TransferStatus.COMPLETE
                elif part_complete:
                    return TransferStatus.PENDING
            if res.state is TransferStatus.PENDING:
                res.state = TransferStatus.FAILED
                res.error = (f"done after {res.layers_done} complete layers, sender said "
                             f"layers {first_layer}..{first_layer + num_layers - 1}"
                             f"{'' if part_complete else ' (its part incomplete)'}, pool has "
                             f"{res.num_layers}")
            state, layers = res.state, res.layers_done
        self._notify()
        if state is not TransferStatus.COMPLETE:
            raise ChunkRejected("ABORTED", f"request {request_id} is {state.value} "
                                f"({layers}/{res.num_layers} layers): {res.error}")
        return state

    def sender_abort(self, request_id: str, reason: str, *, secret: str) -> None:
        """The sender gave the transfer up: FAILED, once the secret is the reservation's."""
        self.admit(request_id, secret)
        self.fail(request_id, reason)

    def admit(self, request_id: str, secret: str) -> _Reservation:
        """The reservation `request_id`, if `secret` is its own; refuses (NOT_FOUND,
        PERMISSION_DENIED) without touching it otherwise."""
        res = self._lookup(request_id)
        if not secret_matches(res, secret):
            raise ChunkRejected("PERMISSION_DENIED",
                                f"request {request_id!r}: missing or wrong reservation secret")
        return res

    def fail(self, request_id: str, reason: str) -> None:
        """Owner side: mark a pending request FAILED (no more writes); a no-op for others."""
        with self._cond:
            res = self._table.get(request_id)
        if res is None:
            return
        with res.lock:
            if res.state is TransferStatus.PENDING:
                res.state, res.error = TransferStatus.FAILED, reason
        self._notify()

    def reserved_blocks(self, request_id: str) -> int:
        """How many blocks the reservation receives (0 if unknown)."""
        with self._cond:
            res = self._table.get(request_id)
            return 0 if res is None else len(res.block_ids)

    @property
    def num_reservations(self) -> int:
        """Reservations not cancelled or expired yet (what a test of "nothing leaked"
        reads on every rank)."""
        with self._cond:
            return len(self._table)

    def layers_received(self, request_id: str) -> int:
        with self._cond:
            res = self._table.get(request_id)
            return 0 if res is None else res.layers_done

    # ---- internals -------------------------------------------------------------------------

    def _lookup(self, request_id: str) -> _Reservation:
        with self._cond:
            res = self._table.get(request_id)
        if res is None:
            raise ChunkRejected("NOT_FOUND",
                                f"request {request_id!r} is not expected here (never reserved, "
                                "cancelled, or expired)")
        return res

    def _state(self, request_id: str) -> TransferStatus:
        res = self._table.get(request_id)
        return TransferStatus.UNKNOWN if res is None else res.state

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()


def transfer_error(code: str, message: str) -> KVTransferError:
    """The sender-side exception for a receiver's refusal code (a gRPC status code name)."""
    if code == "FAILED_PRECONDITION":
        return IncompatibleKVError(message)
    return KVTransferError(f"{code}: {message}")
