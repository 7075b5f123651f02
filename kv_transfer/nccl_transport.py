"""The `nccl` transport: KV blocks GPU to GPU over pooled CuPy NCCL communicators.

Pairing: one 2-rank communicator per (prefill worker, decode worker), made once at cluster
start (cluster/nccl_setup.py) and reused by every request: the prefill side makes the
unique id (`unique_id`), both sides `connect(peer_id, uid, rank)` at the same time (prefill
rank 0, decode rank 1). A decode worker's `KVSink.address` is its worker id; `open` picks
the communicator by it.

Ordering: NCCL point-to-point traffic is FIFO per pair, so the requests of one pair go on
the wire strictly one after another (nccl_wire has the message layout). A handle's sends are
enqueued only once every earlier handle on the pair has enqueued its trailer; until then
`send_layer` just records the compute event. Sends run on the pair's own stream, after the
event recorded in `send_layer`, so the forward pass never waits: layer l is on the wire
while layer l+1 computes.

Failure: `finish(timeout)` polls, so it returns in time even if the peer died; on timeout
the communicator is aborted (in the background), the pair marked broken, and every request
on it fails. `open` on a broken pair fails at once, so the router retries another pair;
`connect` again (cluster/nccl_setup.reconnect_broken) replaces it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kv_transfer.base import KVSender, KVSink, KVTransferError, LayerTracker, SendHandle
from kv_transfer.nccl_device import CudaDevice, poll
from kv_transfer.nccl_receiver import NcclKVReceiver
from kv_transfer.nccl_wire import (
    HELLO_MAGIC,
    OUTCOME_ABORTED,
    OUTCOME_DONE,
    WARM_BYTES,
    Header,
    Trailer,
    blocks_hash,
    compat_hash,
    request_key,
    send_plan,
)

log = logging.getLogger("pdserve.kv.nccl")


class _SendPair:
    """The communicator to one decode worker, its send stream, and the FIFO of requests.

    `queue` holds handles whose trailer is not enqueued yet, head first; only the head has
    anything on the wire. `live` holds every handle that may still be waited on. All NCCL
    calls on the communicator happen under `lock`, and none after `broken` is set.
    """

    def __init__(self, peer_id: str, comm: Any, device: Any) -> None:
        self.peer_id = peer_id
        self.comm = comm
        self.device = device
        self.stream = device.new_stream()
        self.lock = threading.Lock()
        self.queue: deque[NcclSendHandle] = deque()
        self.live: set[NcclSendHandle] = set()
        self.broken = ""

    def submit(self, handle: NcclSendHandle) -> None:
        with self.lock:
            if self.broken:
                raise KVTransferError(f"NCCL pair to {self.peer_id} is broken: {self.broken}")
            self.queue.append(handle)
            self.live.add(handle)
            self._pump()

    def update(self, change: Callable[[], None]) -> None:
        """Apply `change` to a handle's state, then enqueue whatever became ready."""
        with self.lock:
            if not self.broken:
                change()
                self._pump()

    def withdraw(self, handle: NcclSendHandle) -> bool:
        """Drop a handle that has sent nothing; False once it is on the wire."""
        with self.lock:
            self.live.discard(handle)
            if handle.started or handle not in self.queue:
                return False
            self.queue.remove(handle)
            return True

    def release(self, handle: NcclSendHandle) -> None:
        with self.lock:
            self.live.discard(handle)

    def break_(self, reason: str) -> None:
        with self.lock:
            self._break(reason)

    def _pump(self) -> None:
        try:
            while self.queue and not self.broken:
                if not self.queue[0].issue(self.comm, self.stream):
                    return
                self.queue.popleft()
        except Exception as e:  # noqa: BLE001 - any NCCL/CUDA error leaves the stream out of step
            self._break(f"sending to {self.peer_id} failed: {e}")

    def _break(self, reason: str) -> None:
        if self.broken:
            return
        self.broken = reason
        log.warning("NCCL pair to %s broken: %s", self.peer_id, reason)
        for handle in self.live:
            handle.error = reason  # set before the abort can complete any event
        self.queue.clear()
        self.live.clear()
        # ncclCommAbort can take a while; the caller (often inside a timeout) must not wait.
        threading.Thread(target=self._abort, name=f"kv-nccl-abort-{self.peer_id}",
                         daemon=True).start()

    def _abort(self) -> None:
        try:
            self.comm.abort()
        except Exception:  # noqa: BLE001 - already dead is what we wanted
            log.exception("aborting the NCCL communicator to %s", self.peer_id)


class NcclKVSender(KVSender):
    """Prefill side: one `_SendPair` per connected decode worker."""

    transport = "nccl"

    def __init__(self, pool: torch.Tensor, compat_key: str, device: Any = None) -> None:
        super().__init__(pool, compat_key)
        self.device = device if device is not None else CudaDevice(pool.device)
        self._pairs: dict[str, _SendPair] = {}
        self._lock = threading.Lock()

    def unique_id(self) -> list[int]:
        """A fresh NCCL unique id (plain ints, so it crosses Ray as JSON-like data)."""
        return self.device.unique_id()

    def connect(self, peer_id: str, uid: Sequence[int], rank: int = 0,
                timeout: float = 120.0) -> None:
        """Join the communicator `uid` with decode worker `peer_id` (which joins it too)."""
        comm = self.device.connect(uid, rank)
        pair = _SendPair(peer_id, comm, self.device)
        dev, stream = self.device, pair.stream
        hello, warm = dev.upload([HELLO_MAGIC], stream), dev.scratch(WARM_BYTES, stream)
        with comm.group():
            comm.send(hello, stream)
            comm.send(warm, stream)
        done = dev.record(stream)
        if not poll(done.query, time.time() + timeout):
            pair.break_("no hello from the decode side")
            raise KVTransferError(f"NCCL connect to {peer_id}: peer silent for {timeout} s")
        with self._lock:
            old, self._pairs[peer_id] = self._pairs.get(peer_id), pair
        if old is not None:
            old.break_("replaced by a new communicator")

    def broken_peers(self) -> list[str]:
        with self._lock:
            return sorted(p for p, pair in self._pairs.items() if pair.broken)

    def open(self, sink: KVSink, src_block_ids: Sequence[int]) -> NcclSendHandle:
        self.check_sink(sink, src_block_ids)
        with self._lock:
            pair = self._pairs.get(sink.address)
        if pair is None:
            raise KVTransferError(f"request {sink.request_id}: no NCCL communicator to decode "
                                  f"worker {sink.address!r} (connected: {sorted(self._pairs)})")
        handle = NcclSendHandle(pair, sink, self.pool, list(src_block_ids), self.compat_key)
        pair.submit(handle)
        return handle

    def close(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.break_("sender closed")


class NcclSendHandle(SendHandle):
    """One request on a pair. `issue` runs under the pair's lock; the rest is thread-safe."""

    def __init__(self, pair: _SendPair, sink: KVSink, pool: torch.Tensor, src_ids: list[int],
                 compat_key: str) -> None:
        self.request_id = sink.request_id
        self._pair, self._pool, self._device = pair, pool, pair.device
        self._deadline = sink.deadline
        self._layers = pool.shape[0]
        self._tracker = LayerTracker(sink.request_id, self._layers)
        self._plan = send_plan(src_ids, sink.block_ids)
        self._src_ids = src_ids
        bb = pool[0, 0, 0].numel() * pool.element_size()
        self._block_bytes, self._kv_stride = bb, pool.shape[2] * bb  # K of a layer -> its V
        self._header = Header(request_key(sink.request_id), len(src_ids), self._layers,
                              len(self._plan), bb, compat_hash(compat_key),
                              blocks_hash(sink.block_ids))
        self._ready: dict[int, Any] = {}  # layer -> compute event, until enqueued
        self._idx: dict[int, torch.Tensor] = {}  # run -> gather indices on the device
        self._next = 0  # the next layer to enqueue; layers go in order
        self._real = 0  # layers enqueued with their computed data (not abort filler)
        self._aborting = False
        self._done: Any = None  # event after the trailer
        self.started = False
        self.error = ""

    def send_layer(self, layer: int) -> None:
        self._tracker.claim(layer)
        event = self._device.record(self._device.current_stream())
        self._pair.update(lambda: self._ready.__setitem__(layer, event))

    def finish(self, timeout: float | None = None) -> None:
        self._tracker.close()
        missing = self._tracker.missing()
        if missing:
            self._abort_on_wire()
            raise KVTransferError(f"request {self.request_id}: finish before layers {missing}")
        deadline = self._deadline if timeout is None else time.time() + timeout
        try:
            ok = poll(lambda: bool(self.error) or (self._done is not None and self._done.query()),
                      deadline)
        except Exception as e:  # noqa: BLE001 - a CUDA error while waiting: the pair is unusable
            self._pair.break_(f"request {self.request_id}: waiting for the sends failed: {e}")
            ok = False
        if not self.error and not ok:
            self._pair.break_(f"request {self.request_id} not delivered within {timeout} s")
        self._pair.release(self)
        if self.error:
            raise KVTransferError(f"request {self.request_id}: {self.error}")

    def abort(self) -> None:
        if not self._tracker.closed:
            self._tracker.close()
            self._abort_on_wire()

    def _abort_on_wire(self) -> None:
        # Once the header is out, the receiver has posted receives for every layer: fill
        # them (with whatever the source blocks hold) and close with an ABORTED trailer so
        # the pair's stream stays in step; the receiver marks the request FAILED.
        if not self._pair.withdraw(self):
            self._pair.update(lambda: setattr(self, "_aborting", True))

    def issue(self, comm: Any, stream: Any) -> bool:
        """Enqueue what is ready, in wire order; True once the trailer is enqueued."""
        dev = self._device
        if not self.started:
            self.started = True
            # Buffers made on `stream` may be dropped once their sends are enqueued on it.
            header = dev.upload(self._header.encode(), stream)
            runs = dev.upload([r.length for r in self._plan], stream)
            self._idx = {i: dev.upload(self._src(r), stream)
                         for i, r in enumerate(self._plan) if r.src_first < 0}
            with comm.group():
                comm.send(header, stream)
                comm.send(runs, stream)
        while self._next < self._layers:
            event = self._ready.pop(self._next, None)
            if event is None and not self._aborting:
                return False
            if event is not None:
                dev.wait(stream, event)
                self._real += 1
            self._send_layer(comm, stream, self._next)
            self._next += 1
        outcome = OUTCOME_ABORTED if self._aborting else OUTCOME_DONE
        trailer = dev.upload(Trailer(self._header.key, self._real, outcome).encode(), stream)
        with comm.group():
            comm.send(trailer, stream)
        self._done = dev.record(stream)
        return True

    def _src(self, run: Any) -> list[int]:
        return self._src_ids[run.index:run.index + run.length]

    def _send_layer(self, comm: Any, stream: Any, layer: int) -> None:
        # Runs are addressed by byte offsets into the pool: slicing a view per run costs more
        # host time than the NCCL call, and this runs on the forward pass's thread.
        bb, kv = self._block_bytes, self._kv_stride
        base = layer * 2 * kv
        gathered = {i: self._device.gather(self._pool[layer], idx, stream)
                    for i, idx in self._idx.items()}
        with comm.group():
            for i, r in enumerate(self._plan):
                n = r.length * bb
                if r.src_first >= 0:
                    comm.send(self._pool, stream, base + r.src_first * bb, n)
                    comm.send(self._pool, stream, base + kv + r.src_first * bb, n)
                else:  # gathered: [2, length, ...], K then V
                    comm.send(gathered[i], stream, 0, n)
                    comm.send(gathered[i], stream, n, n)


SENDER, RECEIVER = NcclKVSender, NcclKVReceiver  # picked up by kv_transfer.registry
