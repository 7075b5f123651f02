"""Decode side of the `nccl` transport: an announce server and one link per prefill worker.

Announce first (nccl_wire has the message layout): a prefill worker writes each transfer's
announce on the host channel (kv_transfer/nccl_control.py) before it puts a byte on the
communicator. The announce handler checks it against the reservation made by `expect`
(the sink's secret first — without it the transfer is drained and the reservation left as
it was —, compat key, layer count, block size, exact destination ids, still PENDING) and hands a
job to that communicator's `_PeerLink`: a receive into the reservation (reply: accepted) or,
for a refusal, a drain into scratch (reply: refused, drained; the request, if known, is
marked FAILED) — the sender does not wait for the reply before sending, so the bytes come
either way. No NCCL operation is pending on this GPU unless a transfer was announced: an
always-posted receive (the previous design) is a spinning kernel, and with CUDA's lazy
module loading the first launch of any not-yet-loaded kernel, or a cudaFree, waits for the
device to drain — so the decode process stalled until the next transfer arrived, forever
if none did.

When the link is idle, the announce handler posts the job's receives itself, on the thread
that read the announce (a hand-off to another thread costs a wake-up and the GIL on the
time to first token): every layer at once — straight into `pool[layer, 0|1, run]` of the
reserved blocks, no staging copy — in growing groups (the first holds layer 0 alone, so
its kernel receives while the host posts the rest; nccl_device.group_sizes), the TRAILER
in the last. The link's waiter
thread polls until the trailer has landed: COMPLETE if it says every layer was sent, else
FAILED. A job announced while another is in flight waits in the link's queue (its blocks
stay free to cancel) and the waiter posts it when the one before it is done, so jobs are
posted in the order the announces were read (the order the prefill side sends them: one
announce connection per pair). A job whose reservation was cancelled after it was
accepted, but before it was posted, is drained.

Writes versus cancel: the reservation's lock is held from the job's first posted receive
until the trailer landed or the communicator was aborted (taken by the poster, released by
the waiter), so `cancel` (which takes the lock) returns only when no byte can land in the
blocks any more (BlockReceiver's invariant).

Timeouts: a transfer still in flight past its lease or `transfer_timeout`, or whose `wait`
timed out, aborts the communicator: the request is FAILED at once, the link stops (its
queued jobs FAILED) and the pair shows in `broken_peers` until `connect` replaces it; the
prefill side's `finish` times out too. Idle links post nothing and wait on the host.

Options: `nccl_tuning` (see kv_transfer/nccl_device.py; the hello refuses a prefill side
whose tuning differs) and `timing` (CUDA timing events around each request's receives:
`data_seconds(request_id)`, for benchmarks).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kv_transfer.base import KVTransferError, TransferStatus
from pdserve.kv_transfer.nccl_control import ControlServer
from pdserve.kv_transfer.nccl_device import CudaDevice, poll
from pdserve.kv_transfer.nccl_wire import (
    HELLO_MAGIC,
    OUTCOME_DONE,
    TRAILER_LEN,
    WARM_BYTES,
    Announce,
    Trailer,
    block_runs,
    pair_token,
    request_key,
)
from pdserve.kv_transfer.receiver import BlockReceiver, _Reservation, secret_matches

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
    locked: bool = False  # holds res.lock: receiving into the reservation's blocks
    host: Any = None  # the trailer's host copy, valid once `done`
    done: Any = None  # event after the trailer landed
    start: Any = None  # timing event before the first receive (timing on)
    deadline: float = 0.0
    error: str = ""  # posting failed
    trace: dict | None = None  # timing on: host clock (time.time()) at each step


class _PeerLink:
    """One communicator: posts jobs (`submit`, or its waiter thread) and waits for their
    trailers (the waiter thread). NCCL calls on it are made under `_cond`, after `hello`."""

    def __init__(self, rx: NcclKVReceiver, peer_id: str, comm: Any, token: str) -> None:
        self.rx, self.peer_id, self.comm, self.token = rx, peer_id, comm, token
        self.device = rx.device
        self.stream = self.device.new_stream()
        self.stop_reason = ""  # set by anyone; the waiter then aborts the comm and ends
        self.broken = ""
        self._current: _Job | None = None  # posted, trailer not landed yet
        self._pending: deque[_Job] = deque()  # announced behind `_current`, not posted
        self._closed = False  # the waiter has ended: no more jobs
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"kv-nccl-recv-{peer_id}",
                                       daemon=True)

    def stop(self, reason: str) -> None:
        with self._cond:
            if not self.stop_reason:
                self.stop_reason = reason
            self._cond.notify_all()

    def submit(self, job: _Job) -> str:
        """Take an accepted transfer, posting it now if the link is idle (on the caller's
        thread: the announce handler's); "" or, if the link has stopped, why."""
        with self._cond:
            if self._closed or self.stop_reason:
                return self.stop_reason or "stopped"
            if self._current is None and not self._pending:
                self._current = job
                self._start(job)
            else:
                self._pending.append(job)
            self._cond.notify_all()
            return ""

    def hello(self, timeout: float) -> None:
        """The first messages of a new communicator: the prefill side's magic and NCCL
        tuning digest, then WARM_BYTES (see nccl_wire.WARM_BYTES)."""
        dev, s = self.device, self.stream
        buf = dev.words(2, s)
        self.comm.recv_many([(buf, 0, 2 * 8)], s)
        host = dev.download(buf, s)
        dev.download(dev.words(TRAILER_LEN, s), s)  # pin the trailer's host buffer size now
        if not poll(dev.record(s).query, time.time() + timeout) or \
                int(host[0]) != HELLO_MAGIC:
            self._abort("no hello from the prefill side")
            raise KVTransferError(f"NCCL connect to {self.peer_id}: no valid hello in {timeout} "
                                  "s (both sides must use the same NCCL tuning)")
        mine = dev.tuning_digest()
        if int(host[1]) != mine:
            self._abort("NCCL tuning differs")
            raise KVTransferError(
                f"NCCL connect to {self.peer_id}: the prefill side's NCCL tuning (digest "
                f"{int(host[1]):#x}) differs from this decode worker's ({mine:#x}: "
                f"{getattr(dev, 'tuning', {}) or 'none'}); set the same on both sides")
        warm = dev.scratch(WARM_BYTES, s)
        self.comm.recv_many([(warm, 0, WARM_BYTES)], s)
        if not poll(dev.record(s).query, time.time() + timeout):
            self._abort("no warm-up from the prefill side")
            raise KVTransferError(f"NCCL connect to {self.peer_id}: warm-up not received in "
                                  f"{timeout} s")

    def _run(self) -> None:
        reason = "stopped"
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._current is not None or self._pending
                                        or self.stop_reason)
                    if self.stop_reason:
                        break
                    if self._current is None:  # announced while the previous one was busy
                        self._current = self._pending.popleft()
                        self._start(self._current)
                    job = self._current
                self._finish(job)
                with self._cond:
                    self._current = None
        except TimeoutError as e:  # a transfer overran: _finish aborts below
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - the stream is out of step: give the pair up
            reason = f"receiving from {self.peer_id} failed: {e}"
            log.exception("NCCL KV link to %s", self.peer_id)
        self._shutdown(self.stop_reason or reason)

    def _shutdown(self, reason: str) -> None:
        with self._cond:
            self._closed = True
            if not self.stop_reason:
                self.stop_reason = reason
            left = ([self._current] if self._current is not None else []) + list(self._pending)
            self._current, self._pending = None, deque()
        self._abort(reason)
        if any(job.locked for job in left):
            # Let the aborted kernels exit before the lock (and so the blocks) is released.
            poll(self.device.record(self.stream).query, time.time() + _ABORT_GRACE_S)
        why = f"NCCL pair with {self.peer_id} broken: {self.broken or reason}"
        for job in left:
            if job.locked:
                self.rx._settle(job.res, TransferStatus.FAILED, why)
                self.rx._set_inflight(job.rid, None)
                job.locked = False
                job.res.lock.release()
            else:
                self.rx.fail(job.rid, why)

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

    def _start(self, job: _Job) -> None:
        """Under `_cond`: take the reservation's lock (if it is still pending) and post the
        job's receives; a posting error is kept for the waiter, which then aborts."""
        res = job.res
        if res is not None and not job.drain:
            res.lock.acquire()
            if res.forgotten or res.state is not TransferStatus.PENDING:
                res.lock.release()
                # Cancelled (or decided) after it was accepted: the sender sends it regardless.
                self.rx.fail(job.rid, f"request {job.rid} is no longer pending")
                job.drain = True
            else:
                job.locked = True
                self.rx._set_inflight(job.rid, self)
        try:
            self._post(job)
        except Exception as e:  # noqa: BLE001 - reported by the waiter, which aborts the pair
            job.error = f"posting the receives of {job.rid} failed: {e}"

    def _post(self, job: _Job) -> None:
        """Post the job's receives (into its blocks, or into scratch) and its trailer's."""
        dev, comm, s, pool = self.device, self.comm, self.stream, self.rx.pool
        kv = pool.shape[2] * self.rx.block_bytes  # K plane of a layer -> its V plane
        if job.locked:
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
                ops += ([(buf, base + off, n), (buf, base + kv + off, n)] if job.locked
                        else [(buf, 0, n), (buf, 0, n)])
        ops.append((trailer, 0, TRAILER_LEN * 8))  # in the last group: one launch fewer
        deadline = time.time() + self.rx.transfer_timeout
        if job.res is not None:
            deadline = min(deadline, job.res.deadline)
        job.deadline = deadline
        if self.rx.timing:
            job.start = dev.timer(s)
        # Every layer posted at once, the first layer in a group of its own: its kernel
        # receives while the host posts the rest (in growing groups, see group_sizes).
        comm.recv_many(ops, s, first_group=2 * len(job.runs))
        job.host = dev.download(trailer, s)
        job.done = dev.timer(s) if self.rx.timing else dev.record(s)
        if job.trace is not None:
            job.trace["posted"] = time.time()

    def _finish(self, job: _Job) -> None:
        """Wait for the job's trailer and settle it; TimeoutError past the deadline,
        ValueError if the stream is out of step (the caller then aborts)."""
        if job.error:
            raise RuntimeError(job.error)
        if not poll(job.done.query, job.deadline, lambda: bool(self.stop_reason)):
            raise TimeoutError(self.stop_reason or f"request {job.rid}: transfer not done by "
                               "its deadline")
        if job.trace is not None:
            job.trace["landed"] = time.time()
        t = Trailer.decode([int(w) for w in job.host.tolist()])
        if t.key != job.key:
            raise ValueError(f"trailer for key {t.key} closed request {job.rid}")
        if job.start is not None and job.locked:
            self.rx._timed(job.rid, self.device.elapsed(job.start, job.done), job.trace)
        if job.locked:
            ok = t.outcome == OUTCOME_DONE and t.layers_sent == job.num_layers
            self.rx._settle(job.res, TransferStatus.COMPLETE if ok else TransferStatus.FAILED,
                            "" if ok else f"sender aborted after {t.layers_sent}/"
                            f"{job.num_layers} layers")
            if job.trace is not None:
                job.trace["settled"] = time.time()
            self.rx._set_inflight(job.rid, None)
            job.locked = False
            job.res.lock.release()


def _refuse(code: str, error: str, drain: bool = False) -> dict:
    return {"ok": False, "code": code, "error": error, "drain": drain}


class NcclKVReceiver(BlockReceiver):
    """A receiver that prefill workers reach over NCCL; `address` is
    `<decode worker id>@<announce host:port>`."""

    transport = "nccl"

    def __init__(self, pool: torch.Tensor, compat_key: str, name: str | None = None,
                 device: Any = None, transfer_timeout: float = 30.0, host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None,
                 nccl_tuning: str | Mapping[str, Any] | None = None,
                 timing: bool = False) -> None:
        super().__init__(pool, compat_key)
        self.device = device if device is not None else CudaDevice(pool.device, nccl_tuning)
        self.timing = timing
        self._data_s: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # timing on
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
               deadline: float, first_block: int = 0, secret: str | None = None):
        sink = super().expect(request_id, block_ids, num_tokens, deadline, first_block,
                              secret)
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

    def data_seconds(self, request_id: str) -> float | None:
        """Timing on: GPU seconds from the request's first posted receive to its trailer
        landing (the data path as the decode stream saw it); None if not recorded."""
        with self._cond:
            got = self._data_s.get(request_id)
        return None if got is None else got[0]

    def trace(self, request_id: str) -> dict:
        """Timing on: host clock (time.time()) when the request's announce was read, its
        receives posted, its trailer seen landed, and the request settled."""
        with self._cond:
            got = self._data_s.get(request_id)
        return {} if got is None else dict(got[1] or {})

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
        read_at = time.time()
        try:
            a = Announce.from_msg(msg)
        except ValueError as e:
            return _refuse("INVALID_ARGUMENT", str(e))
        rid = a.request_id
        with self._cond:
            link = self._by_token.get(a.pair)
            res, ids = self._table.get(rid), self._ids.get(rid)
            # Only the sink's holder may claim the request (a forged announce must not make
            # the real one look "announced twice", nor fail it).
            admitted = res is not None and secret_matches(res, a.secret)
            again = rid in self._announced
            if admitted:
                self._announced.add(rid)
        if link is None:
            return _refuse("UNAVAILABLE", f"{self._name} has no NCCL communicator {a.pair[:12]} "
                           "(replaced or never made)")
        runs = [(r.dst_first * a.block_bytes, r.length * a.block_bytes)
                for r in block_runs(a.block_ids)]
        if max(n for _, n in runs) > _MAX_SCRATCH or a.num_layers > self.pool.shape[0] * 4:
            return _refuse("INVALID_ARGUMENT", f"request {rid}: announce of {a.num_layers} "
                           f"layers and {a.block_bytes}-byte blocks is out of range")
        code, why = self._check(a, res, ids, again, admitted)
        job = _Job(rid, None if code else res, request_key(rid), a.num_layers, runs,
                   drain=bool(code), trace={"announce": read_at} if self.timing else None)
        stopped = link.submit(job)  # posts its receives now when the link is idle
        if stopped:
            if res is not None and not code:
                self.fail(rid, f"NCCL pair with {link.peer_id} is broken: {stopped}")
            return _refuse("UNAVAILABLE", f"NCCL pair with {link.peer_id} is broken: "
                           f"{stopped}")
        return _refuse(code, why, drain=True) if code else {"ok": True}

    def _check(self, a: Announce, res: _Reservation | None, ids: tuple[int, ...] | None,
               again: bool, admitted: bool) -> tuple[str, str]:
        """("", "") if `a` may land in its reservation, else (status code, why); a known
        request that cannot is marked FAILED — unless the announce lacks its secret, which
        leaves the reservation as it was."""
        rid = a.request_id
        if res is None or ids is None:
            return "NOT_FOUND", (f"request {rid!r} is not expected here (never reserved, "
                                 "cancelled, or expired)")
        if not admitted:
            return "PERMISSION_DENIED", (f"request {rid!r}: missing or wrong reservation "
                                         "secret")
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

    def _timed(self, rid: str, seconds: float, trace: dict | None) -> None:
        with self._cond:
            self._data_s[rid] = (seconds, trace)
            while len(self._data_s) > 1024:
                self._data_s.popitem(last=False)

    def _settle(self, res: _Reservation, state: TransferStatus, error: str) -> None:
        """Called by the link holding `res.lock`: the transfer's outcome, unless decided."""
        with self._cond:
            if res.state is TransferStatus.PENDING and not res.forgotten:
                res.state, res.error = state, error
            self._cond.notify_all()
