"""The `nccl` transport: KV blocks GPU to GPU over pooled CuPy NCCL communicators.

Pairing: one 2-rank communicator per (prefill worker, decode worker), made once at cluster
start (cluster/nccl_setup.py) and reused by every request: the prefill side makes the
unique id (`unique_id`), both sides `connect(peer_id, uid, rank)` at the same time (prefill
rank 0, decode rank 1). A decode worker's `KVSink.address` is `<worker id>@<host:port>`:
the worker id picks the communicator, host:port is its announce channel
(kv_transfer/nccl_control.py).

Announce first: `open` writes the request's announce (request id, compat key, layers, block
bytes, destination ids) on the host channel itself when nothing is queued ahead of it and
the socket takes the frame at once (a ~10 us non-blocking write; the forward pass never
blocks on it); otherwise (first use of the channel, a full socket buffer) the pair's
announcer thread writes it, in order. That thread also reads the replies. Nothing goes on
the communicator for a request before its announce is written, and the decode side posts
receives only for the announces it read, so its GPU has an NCCL operation pending only for
an announced transfer (an always-posted receive stalls every lazily loaded kernel and
cudaFree in the decode process until it completes). The sends do not wait for the reply (a
round trip on the time to first token): the decode side reads a pair's announces in order
and, for every well-formed one, either receives the payload into the reservation or drains
it into scratch. A refusal therefore still sends the request (filler where no layer is
ready) and `finish` raises with its reason; `finish` succeeds only once the payload is
delivered and the announce accepted. A refusal without draining (unknown pair, malformed
announce) or a failed host channel breaks the pair.

Ordering: NCCL point-to-point traffic is FIFO per pair, and calls to one peer run in order
even inside a group, so the two sides may group differently. A handle's sends are enqueued
once its announce is written and every earlier handle on the pair has enqueued its
trailer; until then `send_layer` just records the compute event. Sends run on the pair's
own stream, after the event recorded in `send_layer`, so the forward pass never waits:
layer l is on the wire while l+1 computes. Every layer ready when the pair is pumped goes
into one batch of groups of at most MAX_GROUP_OPS calls (one group a layer when layers come
one at a time; all of them at once when the announce went out after the last layer;
layers that come within HOLD_S of the handle's previous launch wait for the next call); the
stream waits only on the last compute event of a batch from each stream (events on one
stream complete in order), and the trailer joins the group of the last layer.

Failure: `finish(timeout)` polls, so it returns in time even if the peer died; on timeout,
or when the host channel fails (the announce's fate is then unknown), the communicator is
aborted (in the background), the pair marked broken, and every request on it fails.
`open` on a broken pair fails at once, so the router retries another pair; `connect`
again (cluster/nccl_setup.reconnect_broken) replaces it.

Options: `nccl_tuning` (NCCL point-to-point knobs set before the first communicator; see
kv_transfer/nccl_device.py, default none) and `timing` (CUDA timing events around each
request's sends: `handle.data_s`, for benchmarks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pdserve.kv_transfer.base import KVSender, KVSink, KVTransferError, LayerTracker, SendHandle
from pdserve.kv_transfer.nccl_control import ControlClient, ControlError, encode_msg
from pdserve.kv_transfer.nccl_device import CudaDevice, poll
from pdserve.kv_transfer.nccl_receiver import NcclKVReceiver, split_sink_address
from pdserve.kv_transfer.nccl_wire import (
    HELLO_MAGIC,
    OUTCOME_ABORTED,
    OUTCOME_DONE,
    TRAILER_LEN,
    WARM_BYTES,
    Announce,
    Trailer,
    pair_token,
    request_key,
    send_plan,
)
from pdserve.kv_transfer.receiver import transfer_error

log = logging.getLogger("pdserve.kv.nccl")
ANNOUNCE_TIMEOUT_S = 10.0  # a decode side that takes longer to answer is treated as gone
# A layer whose send_layer comes within this long of the handle's previous launch is held
# for the next call (never the last layer, nor an abort): layers that come faster than a
# launch costs on the host (~40 us: event, NCCL group) go out in fewer, larger groups,
# while layers that come a forward-pass layer apart go out at once.
HOLD_S = 40e-6


class _SendPair:
    """The communicator to one decode worker, its send stream, and the FIFO of requests.

    `queue` holds handles whose trailer is not enqueued yet, head first; only the head has
    anything on the wire. `outbox` holds handles whose announce the announcer thread must
    write (a partly written one first); `awaiting` those written whose reply is not read
    yet; `live` every handle that may still be waited on. All NCCL calls on the
    communicator happen under `lock`, and none after `broken` is set; `client` is replaced
    and closed only under `lock`.
    """

    def __init__(self, peer_id: str, comm: Any, device: Any, token: str) -> None:
        self.peer_id = peer_id
        self.comm = comm
        self.device = device
        self.token = token
        self.stream = device.new_stream()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.queue: deque[NcclSendHandle] = deque()
        self.outbox: deque[NcclSendHandle] = deque()
        self.awaiting: deque[NcclSendHandle] = deque()
        self.live: set[NcclSendHandle] = set()
        self.client: ControlClient | None = None
        self.writing = False  # the announcer is writing outside the lock: queue behind it
        self.broken = ""
        self._announcer: threading.Thread | None = None

    def submit(self, handle: NcclSendHandle) -> None:
        with self.lock:
            if self.broken:
                raise KVTransferError(f"NCCL pair to {self.peer_id} is broken: {self.broken}")
            self.queue.append(handle)
            self.live.add(handle)
            if not self._write_now(handle):
                self.outbox.append(handle)
            self.wake.notify()
            if self._announcer is None:
                self._announcer = threading.Thread(target=self._announce_loop, daemon=True,
                                                   name=f"kv-nccl-announce-{self.peer_id}")
                self._announcer.start()

    def _write_now(self, handle: NcclSendHandle) -> bool:
        """Under the lock: write the announce from the caller's thread if nothing is queued
        ahead of it and the socket takes it without blocking (a hand-off to the announcer
        waits for the GIL, which the forward pass holds until its next blocking call).
        False: queue it for the announcer."""
        client = self.client
        if self.outbox or self.writing or client is None or \
                not client.connected_to(handle.control_address):
            return False
        data = encode_msg(handle.announce.to_msg())
        try:
            n = client.send_nowait(data)
        except ControlError as e:
            self._break(f"announcing to {self.peer_id}: {e}")  # fails `handle` too
            return True
        if n <= 0:
            return False
        handle.announced = True  # bytes are out: the decode side may post receives
        if n < len(data):
            handle.rest = data[n:]  # the announcer writes the rest before anything else
            self.outbox.appendleft(handle)
            return True
        self._written(handle)
        return True

    def _written(self, handle: NcclSendHandle) -> None:
        handle.written = True
        if handle.trace is not None:
            handle.trace["written"] = time.time()
        self.awaiting.append(handle)
        self._pump()

    def update(self, change: Callable[[], None]) -> None:
        """Apply `change` to a handle's state, then enqueue whatever became ready."""
        with self.lock:
            if not self.broken:
                change()
                self._pump()

    def withdraw(self, handle: NcclSendHandle) -> bool:
        """Drop a handle whose announce is not written yet; False once it may be."""
        with self.lock:
            self.live.discard(handle)
            if handle.announced:
                return False
            for q in (self.outbox, self.queue):
                if handle in q:
                    q.remove(handle)
            self._pump()
            return True

    def release(self, handle: NcclSendHandle) -> None:
        with self.lock:
            self.live.discard(handle)

    def break_(self, reason: str) -> None:
        with self.lock:
            self._break(reason)

    def _announce_loop(self) -> None:
        while True:
            with self.lock:
                self.wake.wait_for(lambda: self.outbox or self.awaiting or self.broken)
                if self.broken:
                    break
                batch = list(self.outbox)  # written back to back, then the replies read
                self.outbox.clear()
                for handle in batch:
                    handle.announced = True
                self.writing = bool(batch)
                head = self.awaiting[0] if not batch else None
                client = self.client
            try:
                if batch:
                    address = batch[0].control_address
                    if client is None or client.address != address:
                        client = ControlClient(address)
                        with self.lock:
                            old, self.client = self.client, client
                        if old is not None:
                            old.close()
                    for handle in batch:
                        data = handle.rest or encode_msg(handle.announce.to_msg())
                        client.send_bytes(data, handle.announce_timeout())
                        handle.rest = b""
                        # The decode side reads announces in order and posts receives (or
                        # drains) for every one it reads: the payload may flow without
                        # waiting for the reply, which costs a round trip on the TTFT.
                        with self.lock:
                            if self.broken:
                                break
                            self._written(handle)
                    with self.lock:
                        self.writing = False
                    continue
                reply = client.recv(head.announce_timeout())
                if not reply.get("ok") and not reply.get("drain"):
                    raise ControlError(f"{head.request_id} refused and not drained: "
                                       f"{reply.get('error')}")
                with self.lock:
                    if self.broken:
                        break
                    self.awaiting.popleft()
                    head.on_reply(reply)
                    self._pump()
            except ControlError as e:
                self.break_(f"announcing to {self.peer_id}: {e}")
        with self.lock:
            client, self.client = self.client, None
        if client is not None:
            client.close()

    def _pump(self) -> None:
        try:
            while self.queue and not self.broken:
                head = self.queue[0]
                if not head.written or not head.issue(self.comm, self.stream):
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
        self.outbox.clear()
        self.awaiting.clear()
        self.live.clear()
        self.wake.notify_all()
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

    def __init__(self, pool: torch.Tensor, compat_key: str, device: Any = None,
                 nccl_tuning: str | dict | None = None, timing: bool = False) -> None:
        super().__init__(pool, compat_key)
        self.device = device if device is not None else CudaDevice(pool.device, nccl_tuning)
        self.timing = timing
        self._pairs: dict[str, _SendPair] = {}
        self._lock = threading.Lock()

    def unique_id(self) -> list[int]:
        """A fresh NCCL unique id (plain ints, so it crosses Ray as JSON-like data)."""
        return self.device.unique_id()

    def connect(self, peer_id: str, uid: Sequence[int], rank: int = 0,
                timeout: float = 120.0) -> None:
        """Join the communicator `uid` with decode worker `peer_id` (which joins it too)."""
        comm = self.device.connect(uid, rank)
        pair = _SendPair(peer_id, comm, self.device, pair_token(uid))
        dev, stream = self.device, pair.stream
        hello = dev.upload([HELLO_MAGIC, dev.tuning_digest()], stream)
        warm = dev.scratch(WARM_BYTES, stream)
        comm.send_many([(hello, 0, 2 * 8), (warm, 0, WARM_BYTES)], stream)
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
        self.check_sink(sink, src_block_ids)  # host-only: open() never syncs the stream
        peer_id, control = split_sink_address(sink.address)
        with self._lock:
            pair = self._pairs.get(peer_id)
        if pair is None:
            raise KVTransferError(f"request {sink.request_id}: no NCCL communicator to decode "
                                  f"worker {peer_id!r} (connected: {sorted(self._pairs)})")
        handle = NcclSendHandle(pair, sink, control, self.pool,
                                self.blocks_to_send(sink, src_block_ids),
                                self.compat_key, self.timing)
        pair.submit(handle)
        return handle

    def close(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.break_("sender closed")


class NcclSendHandle(SendHandle):
    """One request on a pair. `issue` and `on_reply` run under the pair's lock."""

    def __init__(self, pair: _SendPair, sink: KVSink, control_address: str, pool: torch.Tensor,
                 src_ids: list[int], compat_key: str, timing: bool = False) -> None:
        self.request_id = sink.request_id
        self._pair, self._pool, self._device = pair, pool, pair.device
        self.deadline = sink.deadline
        self.control_address = control_address
        self._layers = pool.shape[0]
        self._tracker = LayerTracker(sink.request_id, self._layers)
        self._plan = send_plan(src_ids, sink.block_ids)
        self._src_ids = src_ids
        bb = pool[0, 0, 0].numel() * pool.element_size()
        self._block_bytes, self._kv_stride = bb, pool.shape[2] * bb  # K of a layer -> its V
        self.announce = Announce(pair.token, sink.request_id, compat_key, self._layers, bb,
                                 sink.block_ids, sink.secret)
        self._key = request_key(sink.request_id)
        self._ready: dict[int, tuple[Any, Any]] = {}  # layer -> (event, its stream), until sent
        self._idx: dict[int, torch.Tensor] = {}  # run -> gather indices on the device
        self._next = 0  # the next layer to enqueue; layers go in order
        self._real = 0  # layers enqueued with their computed data (not abort filler)
        self._aborting = False
        self._done: Any = None  # event after the trailer
        self._opened = time.perf_counter()
        self.announce_s: float | None = None  # open -> accepted, for benchmarks
        self.announced = False  # (partly) written: the decode side may post receives
        self.written = False  # the announce is on the socket: sends may be enqueued
        self.rest = b""  # the part of a partly written announce the announcer must write
        self.accepted = False
        self.rejected = False
        self.started = False
        self.error = ""
        self.error_code = ""
        self._timing = timing
        self._t0: Any = None  # timing events around the sends on the pair's stream
        self.data_s: float | None = None  # first send enqueued -> trailer sent (GPU clock)
        self._launched = 0.0  # perf_counter() of this handle's latest launch (0: none yet)
        # timing on: host clock (time.time()) at open, announce written, first/last launch
        self.trace: dict | None = {"open": time.time()} if timing else None

    def send_layer(self, layer: int) -> None:
        self._tracker.claim(layer)
        stream = self._device.current_stream()
        item = (self._device.record(stream), getattr(stream, "cuda_stream", stream))
        self._pair.update(lambda: self._ready.__setitem__(layer, item))

    def finish(self, timeout: float | None = None) -> None:
        self._tracker.close()
        missing = self._tracker.missing()
        if missing:
            self._abort_on_wire()
            raise KVTransferError(f"request {self.request_id}: finish before layers {missing}")
        deadline = self.deadline if timeout is None else time.time() + timeout
        try:
            # Delivered and accepted: a refusal may come after the bytes were drained.
            ok = poll(lambda: bool(self.error) or (self.accepted and self._done is not None
                                                   and self._done.query()), deadline)
        except Exception as e:  # noqa: BLE001 - a CUDA error while waiting: the pair is unusable
            self._pair.break_(f"request {self.request_id}: waiting for the sends failed: {e}")
            ok = False
        if not self.error and not ok:
            stage = "delivered" if self.accepted else "accepted by the decode side"
            self._pair.break_(f"request {self.request_id} not {stage} within {timeout} s")
        if ok and self._t0 is not None and not self.error:
            self.data_s = self._device.elapsed(self._t0, self._done)
        self._pair.release(self)
        if self.error:
            if self.error_code:
                raise transfer_error(self.error_code, f"request {self.request_id}: {self.error}")
            raise KVTransferError(f"request {self.request_id}: {self.error}")

    def abort(self) -> None:
        if not self._tracker.closed:
            self._tracker.close()
            self._abort_on_wire()

    def _abort_on_wire(self) -> None:
        # Once the announce is out, the receiver may post receives for every layer: fill
        # them (with whatever the source blocks hold) and close with an ABORTED trailer so
        # the pair's stream stays in step; the receiver marks the request FAILED.
        if not self._pair.withdraw(self):
            self._pair.update(lambda: setattr(self, "_aborting", True))

    def announce_timeout(self) -> float:
        return max(0.05, min(ANNOUNCE_TIMEOUT_S, self.deadline - time.time()))

    def on_reply(self, reply: dict) -> None:
        """The decode side's answer to the announce (under the pair's lock)."""
        if reply.get("ok") is True:
            self.accepted = True
            self.announce_s = time.perf_counter() - self._opened
            return
        # Refused but drained: the decode side takes this request's bytes into scratch, so
        # they must still all be sent (filler where no layer is ready) to keep the pair in
        # step; `finish` reports the refusal at once.
        self.rejected = True
        self._aborting = True
        self.error_code = str(reply.get("code") or "UNKNOWN")
        self.error = f"refused by the decode side: {reply.get('error') or 'no reason given'}"

    def issue(self, comm: Any, stream: Any) -> bool:
        """Enqueue what is ready, in wire order; True once the trailer is enqueued."""
        dev = self._device
        if not self.started:
            self.started = True
            # Buffers made on `stream` may be dropped once their sends are enqueued on it.
            self._idx = {i: dev.upload(self._src(r), stream)
                         for i, r in enumerate(self._plan) if r.src_first < 0}
        if self._launched and not self._aborting and self._layers - 1 not in self._ready \
                and time.perf_counter() - self._launched < HOLD_S:
            return False  # more layers are coming right behind: launch them together
        first = self._next
        last: dict[Any, Any] = {}  # source stream -> its latest ready event
        while self._next < self._layers:
            item = self._ready.pop(self._next, None)
            if item is None and not self._aborting:
                break
            if item is not None:
                last[item[1]] = item[0]
                self._real += 1
            self._next += 1
        for event in last.values():  # events on one stream complete in order
            dev.wait(stream, event)
        done = self._next == self._layers
        trailer = None
        if done:
            outcome = OUTCOME_ABORTED if self._aborting else OUTCOME_DONE
            trailer = dev.upload(Trailer(self._key, self._real, outcome).encode(), stream)
        if self._next > first or trailer is not None:
            if self._timing and self._t0 is None:
                self._t0 = dev.timer(stream)
            self._send_layers(comm, stream, first, self._next, trailer)
            self._launched = time.perf_counter()
            if self.trace is not None:
                self.trace.setdefault("first_launch", time.time())
                self.trace["last_launch"] = time.time()
        if not done:
            return False
        self._done = dev.timer(stream) if self._t0 is not None else dev.record(stream)
        return True

    def _src(self, run: Any) -> list[int]:
        return self._src_ids[run.index:run.index + run.length]

    def _send_layers(self, comm: Any, stream: Any, first: int, end: int,
                     trailer: Any = None) -> None:
        # Runs are addressed by byte offsets into the pool: slicing a view per run costs more
        # host time than the NCCL call, and this runs on the forward pass's thread.
        bb, kv, pool = self._block_bytes, self._kv_stride, self._pool
        gathered = {i: self._device.gather(pool[first:end], idx, stream)
                    for i, idx in self._idx.items()} if end > first else {}
        ops = []
        for j in range(end - first):
            base = (first + j) * 2 * kv
            for i, r in enumerate(self._plan):
                n = r.length * bb
                if r.src_first >= 0:
                    at = base + r.src_first * bb
                    ops += [(pool, at, n), (pool, at + kv, n)]
                else:  # gathered: K then V of layer j
                    g = gathered[i]
                    ops += [(g, j * 2 * n, n), (g, j * 2 * n + n, n)]
        if trailer is not None:  # in the last layer's group: one launch fewer
            ops.append((trailer, 0, TRAILER_LEN * 8))
        comm.send_many(ops, stream)


SENDER, RECEIVER = NcclKVSender, NcclKVReceiver  # picked up by kv_transfer.registry
