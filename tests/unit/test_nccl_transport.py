"""The `nccl` transport on CPU: wire format, import hygiene, and the protocol end to end.

CUDA and NCCL are not here, so the protocol runs over `FakeDevice`: streams whose ops run
in order when polled, and a communicator that matches sends to receives FIFO per pair,
completes a send only once its receive took it (like NCCL's rendezvous for large messages),
and records any size mismatch (which NCCL would turn into a hang or garbage). The announce
channel is the real one (TCP on loopback). The GPU test
(tests/gpu/test_nccl_transport_gpu.py) runs the same scenarios over real NCCL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import subprocess
import sys
import threading
import time
from collections import deque

import pytest
import torch

from pdserve.engine.kv_cache.layout import KVLayout
from pdserve.kv_transfer import (
    IncompatibleKVError,
    KVTransferError,
    TransferStatus,
    make_receiver,
    make_sender,
    nccl_device,
    nccl_transport,
)
from pdserve.kv_transfer.nccl_control import ControlClient, ControlError, split_host_port
from pdserve.kv_transfer.nccl_device import apply_nccl_tuning, group_sizes, parse_nccl_tuning
from pdserve.kv_transfer.nccl_transport import NcclKVReceiver, NcclKVSender
from pdserve.kv_transfer.nccl_wire import (
    MAX_GROUP_OPS,
    Announce,
    Run,
    Trailer,
    block_runs,
    pair_token,
    request_key,
    send_plan,
)

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 4, 32, 4, 2, 8
KEY = "compat-a"

# ---- a CPU stand-in for CudaDevice / NcclComm -------------------------------------------------


class _World:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.streams: list[_Stream] = []
        self.channels: dict[tuple, deque] = {}
        self.errors: list[str] = []
        self.ids = itertools.count()

    def progress(self) -> None:
        with self.lock:
            moved = True
            while moved:
                moved = any([s.run() for s in self.streams])


class _Stream:
    def __init__(self, world: _World) -> None:
        self.world, self.ops, self.issued, self.done = world, deque(), 0, 0
        world.streams.append(self)

    def push(self, op) -> None:
        with self.world.lock:
            self.ops.append(op)
            self.issued += 1
        self.world.progress()

    def run(self) -> bool:
        moved = False
        while self.ops and self.ops[0]():
            self.ops.popleft()
            self.done += 1
            moved = True
        return moved


class _Event:
    def __init__(self, stream: _Stream) -> None:
        self.stream, self.seq = stream, stream.issued

    def ready(self) -> bool:
        return self.stream.done >= self.seq

    def query(self) -> bool:
        self.stream.world.progress()
        return self.ready()


class FakeComm:
    def __init__(self, world: _World, uid: tuple, rank: int) -> None:
        self.world, self.uid, self.rank, self.aborted = world, uid, rank, False
        self.groups: list[tuple[str, list[int]]] = []  # NCCL groups the real comm would make

    def _queue(self, sender: int) -> deque:
        return self.world.channels.setdefault((self.uid, sender), deque())

    @contextlib.contextmanager
    def group(self):
        yield

    @staticmethod
    def _bytes(t: torch.Tensor, offset: int, nbytes: int | None) -> torch.Tensor:
        flat = t.reshape(-1).view(torch.uint8)  # the op's closure keeps `t` alive, as CUDA's
        assert offset + (nbytes or 0) <= flat.numel(), "NCCL buffer outside its tensor"
        return flat[offset:] if nbytes is None else flat[offset:offset + nbytes]

    def send(self, t: torch.Tensor, stream: _Stream, offset: int = 0,
             nbytes: int | None = None) -> None:
        msg = {"data": None, "taken": False}

        def op() -> bool:
            if msg["data"] is None and not self.aborted:
                msg["data"] = self._bytes(t, offset, nbytes).clone()
                self._queue(self.rank).append(msg)
            return msg["taken"] or self.aborted

        stream.push(op)

    def recv(self, t: torch.Tensor, stream: _Stream, offset: int = 0,
             nbytes: int | None = None) -> None:
        def op() -> bool:
            q = self._queue(1 - self.rank)
            if self.aborted or not q:
                return self.aborted
            msg = q.popleft()
            dst = self._bytes(t, offset, nbytes)
            if dst.numel() != msg["data"].numel():
                self.world.errors.append(f"recv {dst.numel()} bytes, sent {msg['data'].numel()}")
            else:
                dst.copy_(msg["data"])
            msg["taken"] = True
            return True

        stream.push(op)

    def send_many(self, ops, stream: _Stream, first_group: int = MAX_GROUP_OPS) -> None:
        self.groups.append(("send", group_sizes(len(ops), first_group)))
        for t, offset, nbytes in ops:
            self.send(t, stream, offset, nbytes)

    def recv_many(self, ops, stream: _Stream, first_group: int = MAX_GROUP_OPS) -> None:
        self.groups.append(("recv", group_sizes(len(ops), first_group)))
        for t, offset, nbytes in ops:
            self.recv(t, stream, offset, nbytes)

    def abort(self) -> None:
        self.aborted = True


class FakeDevice:
    def __init__(self, world: _World, digest: int = 0) -> None:
        self.world = world
        self.compute = _Stream(world)
        self.streams: list[_Stream] = []
        self.digest = digest
        self.timed: list[_Event] = []
        self.waits = 0

    def new_stream(self) -> _Stream:
        self.streams.append(_Stream(self.world))
        return self.streams[-1]

    def pending(self) -> int:
        """NCCL (and copy) operations enqueued on this device's streams and not yet done."""
        self.world.progress()
        return sum(len(s.ops) for s in self.streams)

    def current_stream(self) -> _Stream:
        return self.compute

    def record(self, stream: _Stream) -> _Event:
        return _Event(stream)

    def timer(self, stream: _Stream) -> _Event:
        self.timed.append(_Event(stream))
        self.timed[-1].at = time.perf_counter()
        return self.timed[-1]

    @staticmethod
    def elapsed(start: _Event, end: _Event) -> float:
        return max(0.0, end.at - start.at)

    def tuning_digest(self) -> int:
        return self.digest

    def wait(self, stream: _Stream, event: _Event) -> None:
        self.waits += 1
        stream.push(event.ready)

    def upload(self, words, stream) -> torch.Tensor:
        return torch.tensor(list(words), dtype=torch.int64)

    def download(self, t: torch.Tensor, stream: _Stream) -> torch.Tensor:
        host = torch.zeros_like(t)
        stream.push(lambda: host.copy_(t) is not None)
        return host

    def words(self, n: int, stream) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.int64)

    def scratch(self, nbytes: int, stream) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8)

    def gather(self, layers_kv: torch.Tensor, idx: torch.Tensor, stream: _Stream):
        out = torch.empty((*layers_kv.shape[:2], idx.numel(), *layers_kv.shape[3:]),
                          dtype=layers_kv.dtype)
        stream.push(lambda: out.copy_(layers_kv.index_select(2, idx)) is not None)
        return out

    def unique_id(self) -> list[int]:
        return [next(self.world.ids)]

    def connect(self, uid, rank: int) -> FakeComm:
        return FakeComm(self.world, tuple(uid), rank)


# ---- wire format and import hygiene ------------------------------------------------------------


def test_announce_and_trailer_round_trip():
    a = Announce(pair_token([1, 2, 3]), "r1", KEY, 32, 32768, (5, 6, 9), "s3cret")
    msg = a.to_msg()
    assert Announce.from_msg(msg) == a
    assert Trailer.decode(Trailer(7, 32, 1).encode()) == Trailer(7, 32, 1)
    with pytest.raises(ValueError, match="not an nccl KV announce"):
        Announce.from_msg({**msg, "extra": 1})
    with pytest.raises(ValueError, match="wrong types"):
        Announce.from_msg({**msg, "block_ids": [1, "2"]})
    with pytest.raises(ValueError, match="out of range"):
        Announce.from_msg({**msg, "num_layers": 0})
    with pytest.raises(ValueError, match="trailer"):
        Trailer.decode([0, 1, 2, 3])


def test_request_key_and_pair_token_are_stable():
    # Pinned values: both sides of a pair may run different Python builds and hash seeds.
    assert request_key("req-0") == request_key("req-0") == 0x63751A964FD08028
    keys = {request_key(f"req-{i}") for i in range(1000)}
    assert len(keys) == 1000 and all(0 <= k < 1 << 63 for k in keys)
    assert pair_token([1, 2, 3]) == pair_token((1, 2, 3)) != pair_token([1, 2, 4])


def test_runs_and_send_plan():
    assert block_runs([5, 6, 7, 2, 9, 10]) == [Run(0, 3, 5), Run(3, 1, 2), Run(4, 2, 9)]
    plan = send_plan([1, 2, 3, 8, 4, 0], [5, 6, 7, 2, 9, 10])
    assert [(r.length, r.src_first) for r in plan] == [(3, 1), (1, 8), (2, -1)]


def test_importing_kv_transfer_does_not_import_cupy():
    code = ("import sys, kv_transfer, kv_transfer.nccl_transport; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_gives_a_clear_error_without_cuda():
    pool = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "float32").allocate(BLOCKS, "cpu")
    with pytest.raises(ValueError, match="CUDA device.*grpc"):
        make_sender("nccl", pool, KEY)
    with pytest.raises(ValueError, match="CUDA device"):
        make_receiver("nccl", pool, KEY, name="decode-0")


# ---- the protocol over the CPU stand-in -------------------------------------------------------


def connect(tx: NcclKVSender, rx: NcclKVReceiver) -> None:
    """Both sides join at once, as cluster/nccl_setup.py does through Ray."""
    uid = tx.unique_id()
    t = threading.Thread(target=rx.connect, args=("prefill-0", uid, 1))
    t.start()
    tx.connect("decode-0", uid, 0)
    t.join()


class Pair:
    """A connected (sender, receiver) over one fake world; `new_receiver` stands in for a
    restarted decode worker (same pool, same worker id, a fresh announce port)."""

    def __init__(self, world: _World, **rx_opts) -> None:
        gen = torch.Generator().manual_seed(0)
        self.world, self.rx_opts = world, rx_opts
        self.dst = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "bfloat16").allocate(BLOCKS, "cpu")
        self.src = torch.randn(self.dst.shape, generator=gen).to(self.dst.dtype)
        self.tx = NcclKVSender(self.src, KEY, device=FakeDevice(world))
        self.receivers: list[NcclKVReceiver] = []
        self.rx = self.new_receiver()

    def new_receiver(self) -> NcclKVReceiver:
        self.rx_dev = FakeDevice(self.world)
        rx = NcclKVReceiver(self.dst, KEY, name="decode-0", device=self.rx_dev, **self.rx_opts)
        self.receivers.append(rx)
        connect(self.tx, rx)
        return rx

    def close(self) -> None:
        self.tx.close()
        for rx in self.receivers:
            rx.close()


@pytest.fixture
def pair():
    """pair(**receiver_opts) -> Pair, connected."""
    world = _World()
    made: list[Pair] = []

    def make(**rx_opts) -> Pair:
        made.append(Pair(world, **rx_opts))
        return made[-1]

    yield make
    for p in made:
        p.close()
    assert not world.errors, world.errors


def send_all(tx, sink, src_ids):
    handle = tx.open(sink, src_ids)
    for layer in range(LAYERS):
        handle.send_layer(layer)
    return handle


def expect(rx, rid, dst_ids):
    return rx.expect(rid, dst_ids, len(dst_ids) * BLOCK_SIZE - 1, time.time() + 30)


def landed(p: Pair, src_ids, dst_ids) -> bool:
    return torch.equal(p.dst[:, :, dst_ids], p.src[:, :, src_ids])


def until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_blocks_land_bit_for_bit_in_scattered_reserved_blocks(pair):
    p = pair()
    assert p.rx.address.startswith("decode-0@127.0.0.1:")
    src_ids, dst_ids = [3, 17, 8, 9, 25], [30, 2, 3, 4, 11]  # direct and gathered runs
    handle = send_all(p.tx, expect(p.rx, "r1", dst_ids), src_ids)
    handle.finish(5)
    assert handle.accepted and handle.announce_s is not None
    assert p.rx.wait("r1", 5) is TransferStatus.COMPLETE
    assert landed(p, src_ids, dst_ids)
    others = [b for b in range(BLOCKS) if b not in dst_ids]
    assert not p.dst[:, :, others].any()


def test_a_sink_from_a_later_block_moves_only_those_blocks(pair):
    """The decode side holds the request's first two blocks: only blocks 2.. travel."""
    p = pair()
    src_ids, dst_ids = [3, 17, 8, 9, 25], [4, 5, 11]
    sink = p.rx.expect("r1", dst_ids, 5 * BLOCK_SIZE - 1, time.time() + 30, first_block=2)
    handle = send_all(p.tx, sink, src_ids)
    handle.finish(5)
    assert p.rx.wait("r1", 5) is TransferStatus.COMPLETE
    assert landed(p, src_ids[2:], dst_ids)
    others = [b for b in range(BLOCKS) if b not in dst_ids]
    assert not p.dst[:, :, others].any()


def test_idle_decode_side_has_no_nccl_operation_pending(pair):
    # The decode GPU must not hold a posted receive while no transfer is announced: it
    # would stall lazily loaded kernels and cudaFree in the decode process until data came.
    p = pair()
    assert p.rx_dev.pending() == 0  # after connect
    sink = expect(p.rx, "r1", [1, 2])
    assert p.rx_dev.pending() == 0  # a reservation alone posts nothing
    handle = p.tx.open(sink, [3, 4])
    assert until(lambda: handle.accepted)
    assert until(lambda: p.rx_dev.pending() > 0)  # announced: receives posted
    for layer in range(LAYERS):
        handle.send_layer(layer)
    handle.finish(5)
    assert p.rx.wait("r1", 5) is TransferStatus.COMPLETE
    assert until(lambda: p.rx_dev.pending() == 0)  # and nothing left behind


def test_concurrent_requests_on_one_pair_go_in_order(pair):
    p = pair()
    reqs = [("a", [0, 1, 2], [10, 11, 12]), ("b", [5, 9], [20, 1]), ("c", [30], [31])]
    handles = [p.tx.open(expect(p.rx, rid, d), s) for rid, s, d in reqs]
    for layer in range(LAYERS):  # as the prefill step does: every request, layer by layer
        for h in handles:
            h.send_layer(layer)
    for h in reversed(handles):
        h.finish(5)
    for rid, s, d in reqs:
        assert p.rx.wait(rid, 5) is TransferStatus.COMPLETE
        assert landed(p, s, d)


def test_announce_for_a_cancelled_request_is_refused_and_drained(pair):
    p = pair()
    sink = expect(p.rx, "gone", [4, 5])
    p.rx.cancel("gone")
    with pytest.raises(KVTransferError, match="NOT_FOUND.*not expected here"):
        send_all(p.tx, sink, [1, 2]).finish(5)
    assert p.rx.status("gone") is TransferStatus.UNKNOWN
    send_all(p.tx, expect(p.rx, "next", [6]), [7]).finish(5)  # behind the drained bytes
    assert p.rx.wait("next", 5) is TransferStatus.COMPLETE and landed(p, [7], [6])
    assert not p.dst[:, :, [4, 5]].any() and until(lambda: p.rx_dev.pending() == 0)
    assert p.tx.broken_peers() == [] and p.rx.broken_peers() == []


def test_payload_flows_without_waiting_for_the_reply(pair, monkeypatch):
    p = pair()
    gate, real = threading.Event(), ControlClient.recv

    def held(self, timeout):  # the reply is late; the decode side already posted receives
        gate.wait(5)
        return real(self, timeout)

    monkeypatch.setattr(ControlClient, "recv", held)
    handle = send_all(p.tx, expect(p.rx, "r", [1, 2]), [3, 4])
    assert p.rx.wait("r", 5) is TransferStatus.COMPLETE and landed(p, [3, 4], [1, 2])
    assert not handle.accepted
    gate.set()
    handle.finish(5)
    assert handle.accepted


def test_request_cancelled_after_acceptance_is_drained_and_the_pair_stays_in_step(pair):
    p = pair()
    first = p.tx.open(expect(p.rx, "first", [1, 2]), [3, 4])
    first.send_layer(0)  # the link is busy with `first` until its last layer comes
    second = p.tx.open(expect(p.rx, "second", [8, 9]), [10, 11])
    assert until(lambda: second.accepted)  # queued behind `first` on the decode side
    p.rx.cancel("second")  # its blocks may be reused at once: nothing may land in them
    for layer in range(LAYERS):
        if layer:
            first.send_layer(layer)
        second.send_layer(layer)
    first.finish(5)
    second.finish(5)  # delivered (into scratch): the sender cannot tell
    assert p.rx.wait("first", 5) is TransferStatus.COMPLETE and landed(p, [3, 4], [1, 2])
    assert not p.dst[:, :, [8, 9]].any() and p.rx.status("second") is TransferStatus.UNKNOWN
    send_all(p.tx, expect(p.rx, "next", [6]), [7]).finish(5)
    assert p.rx.wait("next", 5) is TransferStatus.COMPLETE and landed(p, [7], [6])


def test_incompatible_announce_is_refused_and_fails_the_request(pair):
    p = pair()
    sink = expect(p.rx, "r", [3])
    other = NcclKVSender(p.src, "compat-b", device=FakeDevice(p.world))
    with pytest.raises(IncompatibleKVError):
        other.open(sink, [4])  # the sender's own check, before anything is sent
    # A sender that skips its own check is refused by the decode side's announce check.
    forged = dataclasses.replace(sink, compat_key="compat-b")
    p.tx.compat_key = "compat-b"  # the same pair, now sending under another key
    with pytest.raises(IncompatibleKVError, match="compatibility key"):
        send_all(p.tx, forged, [4]).finish(5)
    assert p.rx.wait("r", 1) is TransferStatus.FAILED
    assert "compatibility key" in p.rx.error("r") and not p.dst.any()
    assert until(lambda: p.rx_dev.pending() == 0) and p.tx.broken_peers() == []


def test_announce_without_the_sinks_secret_is_refused_and_leaves_the_reservation(pair):
    p = pair()
    sink = expect(p.rx, "r", [3, 4])
    for secret in ("", "forged"):  # on the pair itself: the payload comes and is drained
        forged = dataclasses.replace(sink, secret=secret)
        with pytest.raises(KVTransferError, match="PERMISSION_DENIED"):
            send_all(p.tx, forged, [5, 6]).finish(5)
    assert p.rx.status("r") is TransferStatus.PENDING and p.rx.error("r") == ""
    assert not p.dst.any() and until(lambda: p.rx_dev.pending() == 0)
    assert "forged" not in repr(Announce("t", "r", KEY, 1, 8, (1,), "forged"))
    # The sink's holder is neither "announced twice" nor failed by the forgeries.
    send_all(p.tx, sink, [5, 6]).finish(5)
    assert p.rx.wait("r", 5) is TransferStatus.COMPLETE and landed(p, [5, 6], [3, 4])
    assert p.tx.broken_peers() == [] and p.rx.broken_peers() == []


def test_announce_channel_refuses_junk_and_keeps_serving(pair):
    p = pair()
    address = p.rx.address.split("@", 1)[1]
    client = ControlClient(address)
    reply = client.call({"op": "announce", "pair": "x"}, 5)
    assert reply["ok"] is False and reply["code"] == "INVALID_ARGUMENT"
    msg = Announce("not-a-pair", "r", KEY, LAYERS, 8, (1,)).to_msg()
    assert client.call(msg, 5)["code"] == "UNAVAILABLE"
    client.close()
    with socket.create_connection(split_host_port(address)) as raw:
        raw.sendall(b"\xff\xff\xff\xff")  # a 4 GiB frame: the connection is dropped
        assert raw.recv(1) == b""
    send_all(p.tx, expect(p.rx, "ok", [6]), [7]).finish(5)
    assert p.rx.wait("ok", 5) is TransferStatus.COMPLETE


@pytest.mark.parametrize("how", ["abort", "finish-early"])
def test_sender_giving_up_fails_the_request_and_keeps_the_pair(pair, how):
    p = pair()
    handle = p.tx.open(expect(p.rx, "r", [3, 4]), [5, 6])
    handle.send_layer(0)
    handle.send_layer(1)
    assert until(lambda: handle.accepted)
    if how == "abort":
        handle.abort()
    else:
        with pytest.raises(KVTransferError, match="finish before layers"):
            handle.finish(5)
    assert p.rx.wait("r", 5) is TransferStatus.FAILED
    assert "aborted after 2/4" in p.rx.error("r")
    send_all(p.tx, expect(p.rx, "r2", [8]), [9]).finish(5)
    assert p.rx.wait("r2", 5) is TransferStatus.COMPLETE and landed(p, [9], [8])
    assert p.rx.broken_peers() == [] and p.tx.broken_peers() == []


def test_withdrawn_request_sends_nothing(pair, monkeypatch):
    p = pair()
    gate, real = threading.Event(), ControlClient.send

    def held(self, msg, timeout):  # the announcer sits on `first` until the gate opens
        gate.wait(5)
        return real(self, msg, timeout)

    monkeypatch.setattr(ControlClient, "send", held)
    first = p.tx.open(expect(p.rx, "first", [1]), [1])
    queued = p.tx.open(expect(p.rx, "queued", [2]), [2])  # still in the outbox
    queued.abort()
    gate.set()
    for layer in range(LAYERS):
        first.send_layer(layer)
    first.finish(5)
    assert p.rx.wait("first", 5) is TransferStatus.COMPLETE
    assert not queued.announced  # the decode side never heard of it
    assert p.rx.wait("queued", 0.2) is TransferStatus.PENDING
    assert p.rx_dev.pending() == 0 and p.tx.broken_peers() == []


def test_silent_sender_fails_wait_within_the_timeout(pair):
    p = pair()
    handle = p.tx.open(expect(p.rx, "r", [3, 4]), [5, 6])
    handle.send_layer(0)  # ... and the prefill worker dies
    assert until(lambda: handle.accepted)
    t0 = time.monotonic()
    assert p.rx.wait("r", 0.5) is TransferStatus.FAILED
    assert time.monotonic() - t0 < 1.0
    p.rx.cancel("r")  # returns once the link let go of the blocks
    assert p.rx.status("r") is TransferStatus.UNKNOWN
    assert until(lambda: p.rx.broken_peers() == ["prefill-0"])
    # a pair broken on the decode side refuses announces without draining: the prefill
    # side gives the pair up too, at once
    sink = expect(p.rx, "r2", [7])
    with pytest.raises(KVTransferError, match="not drained"):
        send_all(p.tx, sink, [8]).finish(2)
    assert p.tx.broken_peers() == ["decode-0"]


def test_dead_receiver_fails_finish_within_the_timeout_and_the_pair_reconnects(pair):
    p = pair()
    sink = expect(p.rx, "r", [3])
    p.rx.close()  # the decode worker is gone
    handle = send_all(p.tx, sink, [4])
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        handle.finish(0.5)
    assert time.monotonic() - t0 < 1.0
    assert p.tx.broken_peers() == ["decode-0"]
    with pytest.raises(KVTransferError, match="broken"):
        p.tx.open(sink, [6])
    rx = p.new_receiver()  # a restarted decode worker; cluster/nccl_setup pairs it again
    send_all(p.tx, expect(rx, "r3", [7]), [8]).finish(5)
    assert rx.wait("r3", 5) is TransferStatus.COMPLETE and landed(p, [8], [7])


def test_unreachable_announce_channel_breaks_the_pair():
    world = _World()
    p = Pair(world)
    try:
        sink = expect(p.rx, "r", [3])
        p.rx._server.close()  # the host channel is gone, the communicator not yet
        with pytest.raises(KVTransferError, match="announc"):
            send_all(p.tx, sink, [4]).finish(5)
        assert p.tx.broken_peers() == ["decode-0"]
    finally:
        p.close()
    with pytest.raises(ControlError):
        ControlClient(sink.address.split("@", 1)[1]).call({"op": "x"}, 1)


# ---- host latency: announce on the caller's thread, receives posted on the announce thread ----


def test_announce_is_written_by_open_once_the_channel_is_up(pair, monkeypatch):
    p = pair()
    send_all(p.tx, expect(p.rx, "first", [1]), [2]).finish(5)  # connects the channel
    gate, real = threading.Event(), ControlClient.recv

    def held(self, timeout):  # replies are late: the announcer thread sits in recv
        gate.wait(5)
        return real(self, timeout)

    monkeypatch.setattr(ControlClient, "recv", held)
    handle = p.tx.open(expect(p.rx, "r", [3, 4]), [5, 6])
    assert handle.written  # on the socket before open returned: no thread hand-off
    for layer in range(LAYERS):
        handle.send_layer(layer)
    assert p.rx.wait("r", 5) is TransferStatus.COMPLETE and landed(p, [5, 6], [3, 4])
    gate.set()
    handle.finish(5)


def test_partly_written_announce_is_finished_by_the_announcer_in_order(pair, monkeypatch):
    p = pair()
    send_all(p.tx, expect(p.rx, "first", [1]), [2]).finish(5)
    real = ControlClient.send_nowait
    monkeypatch.setattr(ControlClient, "send_nowait", lambda self, data: real(self, data[:7]))
    a = send_all(p.tx, expect(p.rx, "a", [3, 4]), [5, 6])  # 7 bytes now, the rest later
    b = send_all(p.tx, expect(p.rx, "b", [7]), [8])  # queued behind a's rest
    a.finish(5)
    b.finish(5)
    assert p.rx.wait("a", 5) is TransferStatus.COMPLETE and landed(p, [5, 6], [3, 4])
    assert p.rx.wait("b", 5) is TransferStatus.COMPLETE and landed(p, [8], [7])
    assert p.tx.broken_peers() == []


def test_idle_link_posts_on_the_announce_thread_and_a_busy_one_queues(pair, monkeypatch):
    p = pair()
    posters = []
    real = FakeComm.recv_many

    def spy(self, ops, stream, first_group=MAX_GROUP_OPS):
        posters.append(threading.current_thread().name)
        return real(self, ops, stream, first_group)

    monkeypatch.setattr(FakeComm, "recv_many", spy)
    first = p.tx.open(expect(p.rx, "first", [1, 2]), [3, 4])
    first.send_layer(0)
    second = p.tx.open(expect(p.rx, "second", [8, 9]), [10, 11])
    assert until(lambda: second.accepted)
    assert len(posters) == 1 and posters[0].startswith("kv-nccl-ctl")  # no hand-off
    for layer in range(LAYERS):
        if layer:
            first.send_layer(layer)
        second.send_layer(layer)
    first.finish(5)
    second.finish(5)
    assert p.rx.wait("second", 5) is TransferStatus.COMPLETE and landed(p, [10, 11], [8, 9])
    assert posters[1].startswith("kv-nccl-recv")  # posted by the waiter once first was done


def test_stream_waits_once_per_batch_of_ready_layers(pair, monkeypatch):
    p = pair()
    gate, real = threading.Event(), ControlClient.send_bytes

    def held(self, data, timeout):  # the announce goes out after every layer is ready
        gate.wait(5)
        return real(self, data, timeout)

    monkeypatch.setattr(ControlClient, "send_bytes", held)
    handle = send_all(p.tx, expect(p.rx, "r", [3, 4]), [5, 6])
    waits = p.tx.device.waits
    gate.set()
    handle.finish(5)
    assert p.tx.device.waits - waits == 1  # one compute stream: its last event covers all
    assert p.rx.wait("r", 5) is TransferStatus.COMPLETE and landed(p, [5, 6], [3, 4])


def test_timing_option_reports_data_path_seconds():
    world = _World()
    gen = torch.Generator().manual_seed(0)
    dst = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "bfloat16").allocate(BLOCKS, "cpu")
    src = torch.randn(dst.shape, generator=gen).to(dst.dtype)
    tx = NcclKVSender(src, KEY, device=FakeDevice(world), timing=True)
    rx = NcclKVReceiver(dst, KEY, name="decode-0", device=FakeDevice(world), timing=True)
    try:
        connect(tx, rx)
        handle = send_all(tx, expect(rx, "r", [3, 4]), [5, 6])
        handle.finish(5)
        assert rx.wait("r", 5) is TransferStatus.COMPLETE
        assert handle.data_s is not None and handle.data_s >= 0
        assert until(lambda: rx.data_seconds("r") is not None)
    finally:
        tx.close()
        rx.close()
    assert not world.errors, world.errors


def test_pair_with_different_nccl_tuning_is_refused_at_connect():
    world = _World()
    dst = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "bfloat16").allocate(BLOCKS, "cpu")
    tx = NcclKVSender(dst.clone(), KEY, device=FakeDevice(world, digest=1))
    rx = NcclKVReceiver(dst, KEY, name="decode-0", device=FakeDevice(world, digest=2))
    errors = []

    def join():
        try:
            rx.connect("prefill-0", uid, 1, timeout=5)
        except KVTransferError as e:
            errors.append(str(e))

    try:
        uid = tx.unique_id()
        t = threading.Thread(target=join)
        t.start()
        # the prefill side's warm-up is never taken: its connect times out on its own
        threading.Thread(target=lambda: _quiet(tx.connect, "decode-0", uid, 0, 2),
                         daemon=True).start()
        t.join(10)
        assert errors and "NCCL tuning" in errors[0] and "differs" in errors[0], errors
        assert rx.broken_peers() == []  # never joined: nothing to replace
    finally:
        tx.close()
        rx.close()


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except KVTransferError:
        pass


# ---- NCCL tuning option -------------------------------------------------------------------------


def test_nccl_tuning_is_validated():
    assert parse_nccl_tuning("p2p_nvl_chunksize=131072, NCCL_MIN_P2P_NCHANNELS=32") == {
        "NCCL_P2P_NVL_CHUNKSIZE": "131072", "NCCL_MIN_P2P_NCHANNELS": "32"}
    assert parse_nccl_tuning({"MAX_P2P_NCHANNELS": 64}) == {"NCCL_MAX_P2P_NCHANNELS": "64"}
    assert parse_nccl_tuning(None) == parse_nccl_tuning("") == {}
    with pytest.raises(ValueError, match="not one of"):
        parse_nccl_tuning("NVLS_ENABLE=1")  # not a point-to-point knob: never set by us
    with pytest.raises(ValueError, match="not an integer"):
        parse_nccl_tuning("P2P_NVL_CHUNKSIZE=big")
    with pytest.raises(ValueError, match="outside"):
        parse_nccl_tuning("MIN_P2P_NCHANNELS=65")
    with pytest.raises(ValueError, match="exceeds"):
        parse_nccl_tuning("MIN_P2P_NCHANNELS=32,MAX_P2P_NCHANNELS=16")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_nccl_tuning("MIN_P2P_NCHANNELS")


def test_nccl_tuning_is_set_before_the_first_communicator_only(monkeypatch):
    monkeypatch.setattr(nccl_device, "_ENV_AT_INIT", None)
    monkeypatch.delenv("NCCL_P2P_NVL_CHUNKSIZE", raising=False)
    monkeypatch.setenv("PDSERVE_NCCL_TUNING", "P2P_NVL_CHUNKSIZE=262144")
    assert apply_nccl_tuning(None) == {"NCCL_P2P_NVL_CHUNKSIZE": "262144"}
    assert nccl_device.os.environ["NCCL_P2P_NVL_CHUNKSIZE"] == "262144"
    before = nccl_device.tuning_digest()
    nccl_device._mark_comm_made()  # what new_communicator does
    assert apply_nccl_tuning({"P2P_NVL_CHUNKSIZE": 262144})  # the same value: fine
    with pytest.raises(KVTransferError, match="first NCCL communicator"):
        apply_nccl_tuning({"P2P_NVL_CHUNKSIZE": 131072})
    monkeypatch.setenv("NCCL_P2P_NVL_CHUNKSIZE", "65536")  # too late to matter
    assert nccl_device.tuning_digest() == before  # what NCCL read, not the environment now


def test_receives_start_with_a_group_of_one_layer_and_grow():
    assert group_sizes(65, 2) == [2, 4, 8, 16, 32, 3]
    assert group_sizes(65) == [65] and group_sizes(0, 2) == []
    assert group_sizes(600, 254) == [254, 256, 90]


def test_layers_that_come_back_to_back_are_launched_together(pair, monkeypatch):
    p = pair()
    send_all(p.tx, expect(p.rx, "warm", [1]), [2]).finish(5)  # connects the channel
    clock = [100.0]
    monkeypatch.setattr(nccl_transport.time, "perf_counter", lambda: clock[0])
    handle = p.tx.open(expect(p.rx, "r", [3, 4]), [5, 6])
    # The announcer thread pumps the pair when the reply comes, and a pump once the hold is
    # over launches what is held: had the reply come after the clock moved below, layer 1
    # would go alone and layer 2 be held. Let it come first, so only these calls pump.
    assert until(lambda: handle.accepted)
    comm = p.tx._pairs["decode-0"].comm
    before = len(comm.groups)
    assert LAYERS == 4
    handle.send_layer(0)  # launched at once
    handle.send_layer(1)  # 0 us later: held for the next call
    assert len(comm.groups) == before + 1
    clock[0] += 1.0
    handle.send_layer(2)  # a second later: 1 and 2 go out together
    assert len(comm.groups) == before + 2
    handle.send_layer(3)  # right behind, but the last layer is never held: with the trailer
    handle.finish(5)
    sizes = [sum(g) for _, g in comm.groups[before:]]
    assert sizes == [2, 4, 2 + 1], sizes
    assert p.rx.wait("r", 5) is TransferStatus.COMPLETE and landed(p, [5, 6], [3, 4])
