"""Decode side of the `nccl` transport: one receive thread per connected prefill worker.

Each `_PeerLink` thread loops: receive a HEADER (the one message it waits for on the host),
look its request key up among the `expect`ed reservations, then post at once the RUNS, every
layer's grouped receives straight into `pool[layer, 0|1, run]` of the reserved blocks (no
staging copy) and the TRAILER, and poll until the trailer has landed: COMPLETE if it says
every layer was sent, else FAILED. A header for an unknown, cancelled or mismatching request
is drained into a scratch buffer (sized from RUNS) so the stream stays in step, and the
request, if known, is marked FAILED.

Writes versus cancel: the link holds the reservation's lock from its first posted receive
until the trailer landed or the communicator was aborted, so `cancel` (which takes the lock)
returns only when no byte can land in the blocks any more (BlockReceiver's invariant).

Timeouts: a transfer still in flight past its lease or `transfer_timeout`, or whose `wait`
timed out, aborts the communicator: the request is FAILED at once, the link stops and the
pair shows in `broken_peers` until `connect` replaces it; the prefill side's `finish` times
out too. Idle links wait for headers indefinitely (no transfer is at stake).

Hazard (seen on H200s, 2026-11-22): the header receive a link keeps posted is a spinning
NCCL kernel, and CUDA's lazy module loading (the default) makes the first launch of any
not-yet-loaded kernel on this GPU wait for the device to drain; so does cudaFree. Such a
launch in the decode process then stalls until the next header arrives — forever if that
peer never sends again. Load kernels before `connect` (CUDA graphs captured at start-up,
warm-up passes, or CUDA_MODULE_LOADING=EAGER); the lasting fix is to carry headers on a
host channel and post receives only when a transfer is announced.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from kv_transfer.base import KVSink, KVTransferError, TransferStatus
from kv_transfer.nccl_device import CudaDevice, poll
from kv_transfer.nccl_wire import (
    HEADER_LEN,
    HELLO_MAGIC,
    OUTCOME_DONE,
    TRAILER_LEN,
    WARM_BYTES,
    Header,
    Trailer,
    block_runs,
    blocks_hash,
    check_runs,
    compat_hash,
    request_key,
)
from kv_transfer.receiver import BlockReceiver, _Reservation

log = logging.getLogger("pdserve.kv.nccl")
_NAMES = itertools.count()
_ABORT_GRACE_S = 5.0  # how long aborted NCCL kernels get to exit before blocks are released
_MAX_SCRATCH = 1 << 31  # a drain run larger than this is a corrupt header, not a request


class _PeerLink:
    """The receive thread of one communicator. Only this thread makes NCCL calls on it."""

    def __init__(self, rx: NcclKVReceiver, peer_id: str, comm: Any) -> None:
        self.rx, self.peer_id, self.comm = rx, peer_id, comm
        self.device = rx.device
        self.stream = self.device.new_stream()
        self.stop_reason = ""  # set by anyone; the thread then aborts the comm and ends
        self.broken = ""
        self.thread = threading.Thread(target=self._run, name=f"kv-nccl-recv-{peer_id}",
                                       daemon=True)

    def stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason

    def hello(self, timeout: float) -> None:
        """The first message of a new communicator (see nccl_wire.WARM_BYTES)."""
        dev, s = self.device, self.stream
        buf, warm = dev.words(1, s), dev.scratch(WARM_BYTES, s)
        with self.comm.group():
            self.comm.recv(buf, s)
            self.comm.recv(warm, s)
        host = dev.download(buf, s)
        if not poll(dev.record(s).query, time.time() + timeout) or \
                int(host[0]) != HELLO_MAGIC:
            self._abort("no hello from the prefill side")
            raise KVTransferError(f"NCCL connect to {self.peer_id}: no valid hello in {timeout} s")

    def _run(self) -> None:
        reason = "stopped"
        try:
            while not self.stop_reason:
                # Idle links back off sooner: nothing is at stake until a header comes.
                words = self._recv_words(HEADER_LEN, None, eager_s=0.05)
                if words is None:
                    break
                self._serve(Header.decode(words))
        except TimeoutError as e:  # a transfer overran: _receive/_drain aborted or will
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - the stream is out of step: give the pair up
            reason = f"receiving from {self.peer_id} failed: {e}"
            log.exception("NCCL KV link to %s", self.peer_id)
        self._abort(self.stop_reason or reason)

    def _abort(self, reason: str) -> None:
        if self.broken:
            return
        self.stop(reason)
        self.broken = reason
        log.warning("NCCL pair with %s broken: %s", self.peer_id, reason)
        try:
            self.comm.abort()
        except Exception:  # noqa: BLE001 - already dead is what we wanted
            log.exception("aborting the NCCL communicator with %s", self.peer_id)

    def _recv_words(self, n: int, deadline: float | None,
                    eager_s: float = 0.25) -> list[int] | None:
        """Receive n int64 words and wait for them; None if stopped or past `deadline`."""
        dev, s = self.device, self.stream
        buf = dev.words(n, s)
        with self.comm.group():
            self.comm.recv(buf, s)
        host = dev.download(buf, s)
        if not poll(dev.record(s).query, deadline, lambda: bool(self.stop_reason),
                    eager_s=eager_s):
            return None
        return [int(w) for w in host.tolist()]

    def _serve(self, h: Header) -> None:
        rid, res, why = self.rx._claim(h)
        if res is not None:
            with res.lock:
                if not res.forgotten and res.state is TransferStatus.PENDING:
                    self._receive(h, rid, res)
                    return
            why = f"request {rid} is no longer pending"
        if rid is not None and why:
            self.rx.fail(rid, why)
        self._drain(h)

    def _receive(self, h: Header, rid: str, res: _Reservation) -> None:
        """Called with `res.lock` held: land the request in its blocks or abort the comm."""
        dev, comm, s, pool = self.device, self.comm, self.stream, self.rx.pool
        self.rx._set_inflight(rid, self)
        try:
            # Blocks just freed by decode may still be written by queued compute kernels.
            dev.wait(s, dev.record(dev.current_stream()))
            runs_msg = dev.words(h.num_runs, s)  # equal to ours: the blocks hash matched
            bb, kv = h.block_bytes, pool.shape[2] * h.block_bytes  # K of a layer -> its V
            runs = [(r.dst_first * bb, r.length * bb)
                    for r in block_runs(self.rx._block_ids(rid))]
            with comm.group():
                comm.recv(runs_msg, s)
            for layer in range(h.num_layers):
                base = layer * 2 * kv
                with comm.group():  # byte offsets into the pool: no view sliced per run
                    for off, n in runs:
                        comm.recv(pool, s, base + off, n)
                        comm.recv(pool, s, base + kv + off, n)
            deadline = min(res.deadline, time.time() + self.rx.transfer_timeout)
            words = self._recv_words(TRAILER_LEN, deadline)
            if words is None:
                raise TimeoutError(self.stop_reason or f"request {rid}: transfer not done by "
                                   "its deadline")
            t = Trailer.decode(words)
            if t.key != h.key:
                raise ValueError(f"trailer for key {t.key} closed request {rid}")
        except Exception as e:
            self._abort(str(e))
            # Let the aborted kernels exit before the lock (and so the blocks) is released.
            poll(dev.record(s).query, time.time() + _ABORT_GRACE_S)
            self.rx._settle(res, TransferStatus.FAILED, str(e))
            raise
        finally:
            self.rx._set_inflight(rid, None)
        ok = t.outcome == OUTCOME_DONE and t.layers_sent == h.num_layers
        self.rx._settle(res, TransferStatus.COMPLETE if ok else TransferStatus.FAILED,
                        "" if ok else f"sender aborted after {t.layers_sent}/{h.num_layers} "
                        "layers")

    def _drain(self, h: Header) -> None:
        """Receive a request nobody expects into scratch memory, keeping the stream in step."""
        dev, comm, s = self.device, self.comm, self.stream
        deadline = time.time() + self.rx.transfer_timeout
        lengths = self._recv_words(h.num_runs, deadline)
        if lengths is None:
            raise TimeoutError(self.stop_reason or "drain: no RUNS message")
        check_runs(lengths, h)
        if max(lengths) * h.block_bytes > _MAX_SCRATCH:
            raise ValueError(f"header {h} asks for more than {_MAX_SCRATCH} bytes of scratch")
        scratch = dev.scratch(max(lengths) * h.block_bytes, s)
        for _ in range(h.num_layers):
            with comm.group():
                for n in lengths:
                    comm.recv(scratch, s, 0, n * h.block_bytes)
                    comm.recv(scratch, s, 0, n * h.block_bytes)
        words = self._recv_words(TRAILER_LEN, deadline)
        if words is None:
            raise TimeoutError(self.stop_reason or "drain: no trailer")
        Trailer.decode(words)


class NcclKVReceiver(BlockReceiver):
    """A receiver that prefill workers reach over NCCL; `address` is the decode worker id."""

    transport = "nccl"

    def __init__(self, pool: torch.Tensor, compat_key: str, name: str | None = None,
                 device: Any = None, transfer_timeout: float = 30.0) -> None:
        super().__init__(pool, compat_key)
        self.device = device if device is not None else CudaDevice(pool.device)
        self._name = name or f"nccl-kv-{next(_NAMES)}"
        self.transfer_timeout = transfer_timeout
        self._compat = compat_hash(compat_key)
        self._block_bytes = pool[0, 0, 0].numel() * pool.element_size()
        self._keys: dict[int, str] = {}  # request key on the wire -> request id
        self._ids: dict[str, tuple[int, ...]] = {}  # host copy of each reservation's blocks
        self._inflight: dict[str, _PeerLink] = {}
        self._links: dict[str, _PeerLink] = {}

    @property
    def address(self) -> str:
        return self._name

    # ---- pairing (cluster/nccl_setup.py) ------------------------------------------------------

    def unique_id(self) -> list[int]:
        return self.device.unique_id()

    def connect(self, peer_id: str, uid: Sequence[int], rank: int = 1,
                timeout: float = 120.0) -> None:
        """Join the communicator `uid` with prefill worker `peer_id` and start its link."""
        link = _PeerLink(self, peer_id, self.device.connect(uid, rank))
        link.hello(timeout)
        with self._cond:
            old, self._links[peer_id] = self._links.get(peer_id), link
        if old is not None:
            old.stop("replaced by a new communicator")
        link.thread.start()

    def broken_peers(self) -> list[str]:
        with self._cond:
            return sorted(p for p, link in self._links.items() if link.stop_reason)

    # ---- KVReceiver ---------------------------------------------------------------------------

    def expect(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
               deadline: float) -> KVSink:
        key = request_key(request_id)
        with self._cond:
            other = self._keys.get(key)
            if other is not None and other in self._table:
                raise ValueError(f"request {request_id} collides with {other} on the wire key")
        sink = super().expect(request_id, block_ids, num_tokens, deadline)
        with self._cond:
            self._keys[key] = request_id
            self._ids[request_id] = sink.block_ids
        return sink

    def wait(self, request_id: str, timeout: float | None = None) -> TransferStatus:
        state = super().wait(request_id, timeout)
        if state is not TransferStatus.PENDING:
            return state
        reason = f"request {request_id}: transfer not complete within {timeout} s"
        with self._cond:
            link, res = self._inflight.get(request_id), self._table.get(request_id)
            if link is None or res is None or res.state is not TransferStatus.PENDING:
                return self._state(request_id)  # not on the wire yet: nothing to abort
            # FAILED now, so nobody commits; `cancel` still waits for the link to let go.
            res.state, res.error = TransferStatus.FAILED, reason
            self._cond.notify_all()
        link.stop(reason)
        return TransferStatus.FAILED

    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)
        with self._cond:
            self._ids.pop(request_id, None)
            key = request_key(request_id)
            if self._keys.get(key) == request_id:
                del self._keys[key]

    def close(self) -> None:
        with self._cond:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.stop("receiver closed")
        for link in links:
            link.thread.join(timeout=_ABORT_GRACE_S)

    # ---- for the links ------------------------------------------------------------------------

    def _claim(self, h: Header) -> tuple[str | None, _Reservation | None, str]:
        """The reservation a header is for, or why it cannot be received into."""
        with self._cond:
            rid = self._keys.get(h.key)
            res = self._table.get(rid) if rid is not None else None
            ids = self._ids.get(rid) if rid is not None else None
            if res is None or ids is None:
                return rid, None, ""
            checks = [
                (h.compat == self._compat, "sender's KV compatibility key differs"),
                (h.num_layers == self.pool.shape[0], f"{h.num_layers} layers sent"),
                (h.block_bytes == self._block_bytes, f"{h.block_bytes}-byte blocks sent"),
                (h.num_blocks == len(ids) and h.blocks == blocks_hash(ids),
                 "sent for other blocks than reserved"),
                (h.num_runs == len(block_runs(ids)), "run count differs"),
            ]
        bad = [why for ok, why in checks if not ok]
        return rid, (None if bad else res), "; ".join(f"request {rid}: {w}" for w in bad)

    def _block_ids(self, rid: str) -> tuple[int, ...]:
        with self._cond:
            return self._ids[rid]

    def _set_inflight(self, rid: str, link: _PeerLink | None) -> None:
        with self._cond:
            if link is None:
                self._inflight.pop(rid, None)
            else:
                self._inflight[rid] = link

    def _settle(self, res: _Reservation, state: TransferStatus, error: str) -> None:
        """Called by the link holding `res.lock`: the transfer's outcome, unless decided."""
        with self._cond:
            if res.state is TransferStatus.PENDING and not res.forgotten:
                res.state, res.error = state, error
            self._cond.notify_all()
