"""Decode side of the `nccl` transport: an announce server and one link per prefill worker.

Announce first (nccl_wire has the message layout): a prefill worker writes each transfer's
announce on the host channel (kv_transfer/nccl_control.py) before it puts a byte on the
communicator. The announce handler checks it against the reservation made by `expect`
(compat key, layer count, block size, exact destination ids, still PENDING) and queues a
job on that communicator's `_PeerLink`: a receive into the reservation (reply: accepted) or,
for a refusal, a drain into scratch (reply: refused, drained; the request, if known, is
marked FAILED) — the sender does not wait for the reply before sending, so the bytes come
either way. No NCCL operation is pending on this GPU unless a transfer was announced: an
always-posted receive (the previous design) is a spinning kernel, and with CUDA's lazy
module loading the first launch of any not-yet-loaded kernel, or a cudaFree, waits for the
device to drain — so the decode process stalled until the next transfer arrived, forever
if none did.

Each link thread takes its jobs in the order the announces were read (the order the prefill
side sends them: one announce connection per pair), posts every layer's receives at once —
straight into `pool[layer, 0|1, run]` of the reserved blocks, no staging copy — and the
TRAILER, and polls until the trailer has landed: COMPLETE if it says every layer was sent,
else FAILED. A job whose reservation was cancelled after it was accepted is drained too.

Writes versus cancel: the link holds the reservation's lock from its first posted receive
until the trailer landed or the communicator was aborted, so `cancel` (which takes the lock)
returns only when no byte can land in the blocks any more (BlockReceiver's invariant).

Timeouts: a transfer still in flight past its lease or `transfer_timeout`, or whose `wait`
timed out, aborts the communicator: the request is FAILED at once, the link stops (its
queued jobs FAILED) and the pair shows in `broken_peers` until `connect` replaces it; the
prefill side's `finish` times out too. Idle links post nothing and wait on the host.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer.base import KVTransferError, TransferStatus
from kv_transfer.nccl_control import ControlServer
from kv_transfer.nccl_device import CudaDevice, poll
from kv_transfer.nccl_wire import (
    HELLO_MAGIC,
    MAX_GROUP_OPS,
    OUTCOME_DONE,
    TRAILER_LEN,
    WARM_BYTES,
    Announce,
    Trailer,
    block_runs,
    pair_token,
    request_key,
)
from kv_transfer.receiver import BlockReceiver, _Reservation

log = logging.getLogger("pdserve.kv.nccl")
_NAMES = itertools.count()
_ABORT_GRACE_S = 5.0  # how long aborted NCCL kernels get to exit before blocks are released
_MAX_SCRATCH = 1 << 31  # a drained run larger than this is a corrupt announce, not a request


def split_sink_address(address: str) -> tuple[str, str]:
    """`<decode worker id>@<host:port>` -> (worker id, announce address)."""
    name, at, control = address.rpartition("@")
    if not at or not name or not control:
        raise KVTransferError(f"nccl sink address {address!r} is not <worker id>@<host:port>")
    return name, control


@dataclass(slots=True)
class _Job:
    """An accepted announce: what the link posts receives for, in acceptance order."""

    rid: str
    res: _Reservation | None  # None: refused, drained
    key: int
    num_layers: int
    runs: list[tuple[int, int]]  # (byte offset of the run's K in a layer's K plane, bytes)
    drain: bool = False


class _PeerLink:
    """The receive thread of one communicator. Only this thread makes NCCL calls on it
    (after `hello`)."""

    def __init__(self, rx: NcclKVReceiver, peer_id: str, comm: Any, token: str) -> None:
        self.rx, self.peer_id, self.comm, self.token = rx, peer_id, comm, token
        self.device = rx.device
        self.stream = self.device.new_stream()
        self.stop_reason = ""  # set by anyone; the thread then aborts the comm and ends
        self.broken = ""
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"kv-nccl-recv-{peer_id}",
                                       daemon=True)

    def stop(self, reason: str) -> None:
        with self._cond:
            if not self.stop_reason:
                self.stop_reason = reason
            self._cond.notify_all()

    def enqueue(self, job: _Job) -> bool:
        """Queue an accepted transfer; False if the link has stopped."""
        with self._cond:
            if self.stop_reason:
                return False
            self._jobs.append(job)
            self._cond.notify_all()
            return True

    def hello(self, timeout: float) -> None:
        """The first message of a new communicator (see nccl_wire.WARM_BYTES)."""
        dev, s = self.device, self.stream
        buf, warm = dev.words(1, s), dev.scratch(WARM_BYTES, s)
        with self.comm.group():
            self.comm.recv(buf, s)
            self.comm.recv(warm, s)
        host = dev.download(buf, s)
        dev.download(dev.words(TRAILER_LEN, s), s)  # pin the trailer's host buffer size now
        if not poll(dev.record(s).query, time.time() + timeout) or \
                int(host[0]) != HELLO_MAGIC:
            self._abort("no hello from the prefill side")
            raise KVTransferError(f"NCCL connect to {self.peer_id}: no valid hello in {timeout} s")

    def _run(self) -> None:
        reason = "stopped"
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._jobs or self.stop_reason)
                    if self.stop_reason:
                        break
                    job = self._jobs.popleft()
                self._serve(job)
        except TimeoutError as e:  # a transfer overran: _post aborted or will
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - the stream is out of step: give the pair up
            reason = f"receiving from {self.peer_id} failed: {e}"
            log.exception("NCCL KV link to %s", self.peer_id)
        self._abort(self.stop_reason or reason)
        with self._cond:
            left, self._jobs = list(self._jobs), deque()
        for job in left:
            self.rx.fail(job.rid, f"NCCL pair with {self.peer_id} broken: {self.broken}")

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

    def _serve(self, job: _Job) -> None:
        res = job.res
        if res is not None and not job.drain:
            with res.lock:
                if not res.forgotten and res.state is TransferStatus.PENDING:
                    self._receive(job)
                    return
            # Cancelled (or decided) after it was accepted: the sender sends it regardless.
            self.rx.fail(job.rid, f"request {job.rid} is no longer pending")
        self._post(job, into_pool=False)

    def _receive(self, job: _Job) -> None:
        """Called with the reservation's lock held: land the request or abort the comm."""
        res, rid = job.res, job.rid
        self.rx._set_inflight(rid, self)
        try:
            t = self._post(job, into_pool=True)
        except Exception as e:
            self._abort(str(e))
            # Let the aborted kernels exit before the lock (and so the blocks) is released.
            poll(self.device.record(self.stream).query, time.time() + _ABORT_GRACE_S)
            self.rx._settle(res, TransferStatus.FAILED, str(e))
            raise
        finally:
            self.rx._set_inflight(rid, None)
        ok = t.outcome == OUTCOME_DONE and t.layers_sent == job.num_layers
        self.rx._settle(res, TransferStatus.COMPLETE if ok else TransferStatus.FAILED,
                        "" if ok else f"sender aborted after {t.layers_sent}/{job.num_layers} "
                        "layers")

    def _post(self, job: _Job, into_pool: bool) -> Trailer:
        """Post the job's receives (into its blocks, or into scratch) and wait for its
        trailer; TimeoutError past the deadline, ValueError if the stream is out of step."""
        dev, comm, s, pool = self.device, self.comm, self.stream, self.rx.pool
        kv = pool.shape[2] * self.rx.block_bytes  # K plane of a layer -> its V plane
        if into_pool:
            # Blocks just freed by decode may still be written by queued compute kernels.
            dev.wait(s, dev.record(dev.current_stream()))
            buf, layer_bytes = pool, 2 * kv
        else:
            buf, layer_bytes = dev.scratch(max(n for _, n in job.runs), s), 0
        trailer = dev.words(TRAILER_LEN, s)  # allocated before any receive is pending
        ops = []  # (buffer, byte offset, bytes), in wire order
        for layer in range(job.num_layers):
            base = layer * layer_bytes
            for off, n in job.runs:
                ops += ([(buf, base + off, n), (buf, base + kv + off, n)] if into_pool
                        else [(buf, 0, n), (buf, 0, n)])
        for at in range(0, len(ops), MAX_GROUP_OPS):  # every layer posted at once
            with comm.group():
                for t, offset, n in ops[at:at + MAX_GROUP_OPS]:
                    comm.recv(t, s, offset, n)
        with comm.group():
            comm.recv(trailer, s)
        host = dev.download(trailer, s)
        deadline = time.time() + self.rx.transfer_timeout
        if job.res is not None:
            deadline = min(deadline, job.res.deadline)
        if not poll(dev.record(s).query, deadline, lambda: bool(self.stop_reason)):
            raise TimeoutError(self.stop_reason or f"request {job.rid}: transfer not done by "
                               "its deadline")
        t = Trailer.decode([int(w) for w in host.tolist()])
        if t.key != job.key:
            raise ValueError(f"trailer for key {t.key} closed request {job.rid}")
        return t


def _refuse(code: str, error: str, drain: bool = False) -> dict:
    return {"ok": False, "code": code, "error": error, "drain": drain}


class NcclKVReceiver(BlockReceiver):
    """A receiver that prefill workers reach over NCCL; `address` is
    `<decode worker id>@<announce host:port>`."""

    transport = "nccl"

    def __init__(self, pool: torch.Tensor, compat_key: str, name: str | None = None,
                 device: Any = None, transfer_timeout: float = 30.0, host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None) -> None:
        super().__init__(pool, compat_key)
        self.device = device if device is not None else CudaDevice(pool.device)
        self._name = name or f"nccl-kv-{next(_NAMES)}"
        self.transfer_timeout = transfer_timeout
        self.block_bytes = pool[0, 0, 0].numel() * pool.element_size()
        self._ids: dict[str, tuple[int, ...]] = {}  # host copy of each reservation's blocks
        self._announced: set[str] = set()
        self._inflight: dict[str, _PeerLink] = {}
        self._links: dict[str, _PeerLink] = {}
        self._by_token: dict[str, _PeerLink] = {}
        self._server = ControlServer(self._on_announce, host, port, advertise_host,
                                     name=f"kv-nccl-ctl-{self._name}")

    @property
    def address(self) -> str:
        return f"{self._name}@{self._server.address}"

    # ---- pairing (cluster/nccl_setup.py) ------------------------------------------------------

    def unique_id(self) -> list[int]:
        return self.device.unique_id()

    def connect(self, peer_id: str, uid: Sequence[int], rank: int = 1,
                timeout: float = 120.0) -> None:
        """Join the communicator `uid` with prefill worker `peer_id` and start its link."""
        link = _PeerLink(self, peer_id, self.device.connect(uid, rank), pair_token(uid))
        link.hello(timeout)
        with self._cond:
            old, self._links[peer_id] = self._links.get(peer_id), link
            if old is not None:
                self._by_token.pop(old.token, None)
            self._by_token[link.token] = link
        if old is not None:
            old.stop("replaced by a new communicator")
        link.thread.start()

    def broken_peers(self) -> list[str]:
        with self._cond:
            return sorted(p for p, link in self._links.items() if link.stop_reason)

    # ---- KVReceiver ---------------------------------------------------------------------------

    def expect(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
               deadline: float):
        sink = super().expect(request_id, block_ids, num_tokens, deadline)
        with self._cond:
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
                return self._state(request_id)  # no receive posted yet: nothing to abort
            # FAILED now, so nobody commits; `cancel` still waits for the link to let go.
            res.state, res.error = TransferStatus.FAILED, reason
            self._cond.notify_all()
        link.stop(reason)
        return TransferStatus.FAILED

    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)
        with self._cond:
            self._ids.pop(request_id, None)
            self._announced.discard(request_id)

    def close(self) -> None:
        self._server.close()
        with self._cond:
            links, self._links, self._by_token = list(self._links.values()), {}, {}
        for link in links:
            link.stop("receiver closed")
        for link in links:
            if link.thread.is_alive():
                link.thread.join(timeout=_ABORT_GRACE_S)

    # ---- the announce channel -----------------------------------------------------------------

    def _on_announce(self, msg: dict) -> dict:
        """Accept a transfer or refuse it; never raises.

        The sender may already be sending (it does not wait for this reply), so a refusal of
        a well-formed announce on a known pair still queues the transfer, to be drained into
        scratch (`drain: True` in the reply). Only a malformed announce, an unknown pair or
        a stopped link is refused without draining: the sender then gives the pair up."""
        try:
            a = Announce.from_msg(msg)
        except ValueError as e:
            return _refuse("INVALID_ARGUMENT", str(e))
        rid = a.request_id
        with self._cond:
            link = self._by_token.get(a.pair)
            res, ids = self._table.get(rid), self._ids.get(rid)
            again = rid in self._announced
            if res is not None:
                self._announced.add(rid)
        if link is None:
            return _refuse("UNAVAILABLE", f"{self._name} has no NCCL communicator {a.pair[:12]} "
                           "(replaced or never made)")
        runs = [(r.dst_first * a.block_bytes, r.length * a.block_bytes)
                for r in block_runs(a.block_ids)]
        if max(n for _, n in runs) > _MAX_SCRATCH or a.num_layers > self.pool.shape[0] * 4:
            return _refuse("INVALID_ARGUMENT", f"request {rid}: announce of {a.num_layers} "
                           f"layers and {a.block_bytes}-byte blocks is out of range")
        code, why = self._check(a, res, ids, again)
        job = _Job(rid, None if code else res, request_key(rid), a.num_layers, runs,
                   drain=bool(code))
        if not link.enqueue(job):
            return _refuse("UNAVAILABLE", f"NCCL pair with {link.peer_id} is broken: "
                           f"{link.stop_reason}")
        return _refuse(code, why, drain=True) if code else {"ok": True}

    def _check(self, a: Announce, res: _Reservation | None, ids: tuple[int, ...] | None,
               again: bool) -> tuple[str, str]:
        """("", "") if `a` may land in its reservation, else (status code, why); a known
        request that cannot is marked FAILED."""
        rid = a.request_id
        if res is None or ids is None:
            return "NOT_FOUND", (f"request {rid!r} is not expected here (never reserved, "
                                 "cancelled, or expired)")
        if a.compat_key != self.compat_key:
            why = (f"request {rid}: sender KV compatibility key {a.compat_key!r} differs from "
                   f"this decode worker's {self.compat_key!r}")
            self.fail(rid, why)
            return "FAILED_PRECONDITION", why
        checks = [
            (a.num_layers == self.pool.shape[0], f"{a.num_layers} layers sent, pool has "
             f"{self.pool.shape[0]}"),
            (a.block_bytes == self.block_bytes, f"{a.block_bytes}-byte blocks sent, pool has "
             f"{self.block_bytes}"),
            (a.block_ids == ids, "sent for other blocks than reserved"),
            (not again, "announced twice"),
        ]
        bad = "; ".join(why for ok, why in checks if not ok)
        if bad:
            self.fail(rid, f"request {rid}: {bad}")
            return "INVALID_ARGUMENT", f"request {rid}: {bad}"
        if res.state is not TransferStatus.PENDING:
            return "ABORTED", f"request {rid} is {res.state.value}: {res.error}"
        return "", ""

    # ---- for the links ------------------------------------------------------------------------

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
