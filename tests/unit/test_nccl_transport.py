"""The `nccl` transport on CPU: wire format, import hygiene, and the protocol end to end.

CUDA and NCCL are not here, so the protocol runs over `FakeDevice`: streams whose ops run
in order when polled, and a communicator that matches sends to receives FIFO per pair,
completes a send only once its receive took it (like NCCL's rendezvous for large messages),
and records any size mismatch (which NCCL would turn into a hang or garbage). The GPU test
(tests/gpu/test_nccl_transport.py) runs the same scenarios over real NCCL.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import threading
import time
from collections import deque

import pytest
import torch

from engine.kv_cache.layout import KVLayout
from kv_transfer import KVTransferError, TransferStatus, make_receiver, make_sender
from kv_transfer.nccl_transport import NcclKVReceiver, NcclKVSender
from kv_transfer.nccl_wire import (
    HEADER_MAGIC,
    Header,
    Run,
    Trailer,
    block_runs,
    check_runs,
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

    def abort(self) -> None:
        self.aborted = True


class FakeDevice:
    def __init__(self, world: _World) -> None:
        self.world = world
        self.compute = _Stream(world)

    def new_stream(self) -> _Stream:
        return _Stream(self.world)

    def current_stream(self) -> _Stream:
        return self.compute

    def record(self, stream: _Stream) -> _Event:
        return _Event(stream)

    def wait(self, stream: _Stream, event: _Event) -> None:
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

    def gather(self, layer_kv: torch.Tensor, idx: torch.Tensor, stream: _Stream):
        out = torch.empty((2, idx.numel(), *layer_kv.shape[2:]), dtype=layer_kv.dtype)
        stream.push(lambda: out.copy_(layer_kv.index_select(1, idx)) is not None)
        return out

    def unique_id(self) -> list[int]:
        return [next(self.world.ids)]

    def connect(self, uid, rank: int) -> FakeComm:
        return FakeComm(self.world, tuple(uid), rank)


# ---- wire format and import hygiene ------------------------------------------------------------


def test_header_and_trailer_round_trip():
    h = Header(request_key("r1"), 5, 32, 2, 32768, 7, 9)
    words = h.encode()
    assert len(words) == 8 and words[0] == HEADER_MAGIC
    assert Header.decode(words) == h
    assert Trailer.decode(Trailer(h.key, 32, 1).encode()) == Trailer(h.key, 32, 1)
    with pytest.raises(ValueError, match="not an nccl KV header"):
        Header.decode([0, *words[1:]])
    with pytest.raises(ValueError, match="out of range"):
        Header.decode([HEADER_MAGIC, 1, 2, 32, 3, 32768, 7, 9])  # 3 runs of 2 blocks
    with pytest.raises(ValueError, match="trailer"):
        Trailer.decode(words[:4])


def test_request_key_is_stable_and_63_bit():
    # Pinned value: both sides of a pair may run different Python builds and hash seeds.
    assert request_key("req-0") == request_key("req-0") == 0x63751A964FD08028
    keys = {request_key(f"req-{i}") for i in range(1000)}
    assert len(keys) == 1000 and all(0 <= k < 1 << 63 for k in keys)


def test_runs_and_send_plan():
    assert block_runs([5, 6, 7, 2, 9, 10]) == [Run(0, 3, 5), Run(3, 1, 2), Run(4, 2, 9)]
    plan = send_plan([1, 2, 3, 8, 4, 0], [5, 6, 7, 2, 9, 10])
    assert [(r.length, r.src_first) for r in plan] == [(3, 1), (1, 8), (2, -1)]
    check_runs([3, 1, 2], Header(1, 6, 4, 3, 64, 0, 0))
    with pytest.raises(ValueError):
        check_runs([3, 1, 1], Header(1, 6, 4, 3, 64, 0, 0))


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


@pytest.fixture
def pair():
    """pair(**receiver_opts) -> (src pool, dst pool, receiver, sender), connected."""
    world = _World()
    made = []

    def make(**rx_opts):
        gen = torch.Generator().manual_seed(0)
        dst = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "bfloat16").allocate(BLOCKS, "cpu")
        src = torch.randn(dst.shape, generator=gen).to(dst.dtype)
        rx = NcclKVReceiver(dst, KEY, name="decode-0", device=FakeDevice(world), **rx_opts)
        tx = NcclKVSender(src, KEY, device=FakeDevice(world))
        connect(tx, rx)
        made.append((rx, tx))
        return src, dst, rx, tx

    yield make
    for rx, tx in made:
        tx.close()
        rx.close()
    assert not world.errors, world.errors


def send_all(tx, sink, src_ids):
    handle = tx.open(sink, src_ids)
    for layer in range(LAYERS):
        handle.send_layer(layer)
    return handle


def expect(rx, rid, dst_ids):
    return rx.expect(rid, dst_ids, len(dst_ids) * BLOCK_SIZE - 1, time.time() + 30)


def landed(src, dst, src_ids, dst_ids) -> bool:
    return torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])


def test_blocks_land_bit_for_bit_in_scattered_reserved_blocks(pair):
    src, dst, rx, tx = pair()
    src_ids, dst_ids = [3, 17, 8, 9, 25], [30, 2, 3, 4, 11]  # direct and gathered runs
    send_all(tx, expect(rx, "r1", dst_ids), src_ids).finish(5)
    assert rx.wait("r1", 5) is TransferStatus.COMPLETE
    assert landed(src, dst, src_ids, dst_ids)
    others = [b for b in range(BLOCKS) if b not in dst_ids]
    assert not dst[:, :, others].any()


def test_concurrent_requests_on_one_pair_go_in_order(pair):
    src, dst, rx, tx = pair()
    reqs = [("a", [0, 1, 2], [10, 11, 12]), ("b", [5, 9], [20, 1]), ("c", [30], [31])]
    handles = [tx.open(expect(rx, rid, d), s) for rid, s, d in reqs]
    for layer in range(LAYERS):  # as the prefill step does: every request, layer by layer
        for h in handles:
            h.send_layer(layer)
    for h in reversed(handles):
        h.finish(5)
    for rid, s, d in reqs:
        assert rx.wait(rid, 5) is TransferStatus.COMPLETE
        assert landed(src, dst, s, d)


def test_cancelled_request_is_drained_and_the_pair_stays_in_step(pair):
    src, dst, rx, tx = pair()
    sink = expect(rx, "gone", [4, 5])
    rx.cancel("gone")
    send_all(tx, sink, [1, 2]).finish(5)  # delivered (into scratch): the sender cannot tell
    assert rx.status("gone") is TransferStatus.UNKNOWN
    assert not dst.any()
    send_all(tx, expect(rx, "next", [6]), [7]).finish(5)
    assert rx.wait("next", 5) is TransferStatus.COMPLETE and landed(src, dst, [7], [6])


@pytest.mark.parametrize("how", ["abort", "finish-early"])
def test_sender_giving_up_fails_the_request_and_keeps_the_pair(pair, how):
    src, dst, rx, tx = pair()
    handle = tx.open(expect(rx, "r", [3, 4]), [5, 6])
    handle.send_layer(0)
    handle.send_layer(1)
    if how == "abort":
        handle.abort()
    else:
        with pytest.raises(KVTransferError, match="finish before layers"):
            handle.finish(5)
    assert rx.wait("r", 5) is TransferStatus.FAILED
    assert "aborted after 2/4" in rx.error("r")
    send_all(tx, expect(rx, "r2", [8]), [9]).finish(5)
    assert rx.wait("r2", 5) is TransferStatus.COMPLETE and landed(src, dst, [9], [8])
    assert rx.broken_peers() == [] and tx.broken_peers() == []


def test_withdrawn_request_sends_nothing(pair):
    src, dst, rx, tx = pair()
    first = tx.open(expect(rx, "first", [1]), [1])
    queued = tx.open(expect(rx, "queued", [2]), [2])  # behind `first`: nothing on the wire
    queued.abort()
    for layer in range(LAYERS):
        first.send_layer(layer)
    first.finish(5)
    assert rx.wait("first", 5) is TransferStatus.COMPLETE
    assert rx.wait("queued", 0.2) is TransferStatus.PENDING  # never started: nothing to abort


def test_silent_sender_fails_wait_within_the_timeout(pair):
    src, dst, rx, tx = pair()
    handle = tx.open(expect(rx, "r", [3, 4]), [5, 6])
    handle.send_layer(0)  # ... and the prefill worker dies
    t0 = time.monotonic()
    assert rx.wait("r", 0.5) is TransferStatus.FAILED
    assert time.monotonic() - t0 < 1.0
    rx.cancel("r")  # returns once the link let go of the blocks
    assert rx.status("r") is TransferStatus.UNKNOWN
    deadline = time.monotonic() + 5
    while not rx.broken_peers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rx.broken_peers() == ["prefill-0"]


def test_dead_receiver_fails_finish_within_the_timeout_and_the_pair_reconnects(pair):
    src, dst, rx, tx = pair()
    sink = expect(rx, "r", [3])
    rx.close()  # the decode worker is gone
    handle = send_all(tx, sink, [4])
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="not delivered within 0.5"):
        handle.finish(0.5)
    assert time.monotonic() - t0 < 1.0
    assert tx.broken_peers() == ["decode-0"]
    with pytest.raises(KVTransferError, match="broken"):
        tx.open(expect(rx, "r2", [5]), [6])
    connect(tx, rx)  # what cluster/nccl_setup.reconnect_broken does
    send_all(tx, expect(rx, "r3", [7]), [8]).finish(5)
    assert rx.wait("r3", 5) is TransferStatus.COMPLETE and landed(src, dst, [8], [7])
