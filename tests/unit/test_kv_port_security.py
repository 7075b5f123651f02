"""The KV port admits only the sender a reservation was made for, and idle streams cannot
starve it: real loopback gRPC receivers and the in-process transport, no Ray."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest
import torch

from pdserve.engine.kv_cache.layout import KVLayout
from pdserve.kv_transfer import KVTransferError, TransferStatus, make_receiver, make_sender
from pdserve.kv_transfer.receiver import ChunkRejected
from pdserve.kv_transfer.wire import closing_chunk, encode_chunk, pb_grpc

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 2, 16, 16, 2, 8
SRC_IDS, DST_IDS = [3, 7], [9, 1]
NUM_TOKENS = 20
KEY = "compat-a"
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


@pytest.fixture
def pair(request):
    """(src pool, dst pool, receiver, sender) for the transport in `request.param`."""
    transport, rx_opts = request.param
    dst = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "float32").allocate(BLOCKS, "cpu")
    src = torch.randn(dst.shape, generator=torch.Generator().manual_seed(0))
    rx = make_receiver(transport, dst, KEY, **rx_opts)
    tx = make_sender(transport, src, KEY)
    yield src, dst, rx, tx
    tx.close()
    rx.close()


GRPC = ("grpc", {})
# The receiver as it runs for a GPU pool: pool writes on its writer threads, not the loop.
GRPC_THREADED = ("grpc", {"write_inline": False})
BOTH = [GRPC, GRPC_THREADED, ("local", {})]


def push(address: str, chunks, timeout: float = 10) -> grpc.RpcError | None:
    """Send `chunks` as one raw Push stream; the error the receiver answered, if any."""
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.KVTransferStub(channel).Push(iter(chunks), timeout=timeout)
        except grpc.RpcError as e:
            return e
    return None


def forged_stream(src: torch.Tensor, rid: str, secret: str) -> list:
    """Every layer of every block, then `done`: a whole transfer from a stranger."""
    data = [encode_chunk(rid, layer, 0, src[layer, :, :len(DST_IDS)] + 1, KEY, secret=secret)
            for layer in range(LAYERS)]
    return [*data, closing_chunk(rid, LAYERS, compat_key=KEY, secret=secret)]


def test_each_reservation_gets_its_own_unguessable_secret_kept_out_of_repr():
    dst = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "float32").allocate(BLOCKS, "cpu")
    rx = make_receiver("local", dst, KEY)
    try:
        a = rx.expect("a", DST_IDS, NUM_TOKENS, time.time() + 30)
        b = rx.expect("b", [0, 2], NUM_TOKENS, time.time() + 30)
        assert len(a.secret) >= 22 and a.secret != b.secret  # >= 128 bits of urlsafe base64
        assert a.secret not in repr(a) and a.secret not in str(a)
        assert a.to_dict()["secret"] == a.secret  # it does travel in the sink
    finally:
        rx.close()


@pytest.mark.parametrize("pair", [GRPC, GRPC_THREADED], indirect=True)
@pytest.mark.parametrize("secret", ["", "wrong-secret", "\u00e9t\u00e9"])
def test_forged_grpc_stream_is_refused_and_changes_nothing(pair, secret):
    src, dst, rx, tx = pair
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    err = push(rx.address, forged_stream(src, "r1", secret))
    assert err is not None and err.code() is grpc.StatusCode.PERMISSION_DENIED
    # A forged abort, or a stream that just stops, must not fail the request either.
    err = push(rx.address, [closing_chunk("r1", 0, abort=True, compat_key=KEY, secret=secret)])
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    err = push(rx.address, [])
    assert err.code() is grpc.StatusCode.ABORTED
    assert rx.status("r1") is TransferStatus.PENDING and rx.layers_received("r1") == 0
    assert rx.chunks_written == 0 and not dst.any()
    # The rightful sender still completes, and its bytes (not the forger's) are in the pool.
    handle = tx.open(sink, SRC_IDS)
    for layer in range(LAYERS):
        handle.send_layer(layer)
    handle.finish(timeout=10)
    assert rx.wait("r1", 5) is TransferStatus.COMPLETE
    assert torch.equal(dst[:, :, DST_IDS], src[:, :, SRC_IDS])


@pytest.mark.parametrize("pair", BOTH, indirect=True)
def test_sender_with_a_sink_of_the_wrong_secret_is_refused(pair):
    """A sink copied with another reservation's secret (or none) is refused in `finish`."""
    src, dst, rx, tx = pair
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    other = rx.expect("r2", [0, 2], NUM_TOKENS, time.time() + 30)
    for forged in (dataclasses.replace(sink, secret=""),
                   dataclasses.replace(sink, secret=other.secret)):
        handle = tx.open(forged, SRC_IDS)
        for layer in range(LAYERS):
            handle.send_layer(layer)
        with pytest.raises(KVTransferError, match="PERMISSION_DENIED"):
            handle.finish(timeout=10)
    assert rx.status("r1") is TransferStatus.PENDING and rx.status("r2") is TransferStatus.PENDING
    assert not dst.any()


@pytest.mark.parametrize("pair", [("local", {})], indirect=True)
def test_every_transport_side_call_checks_the_secret_before_the_reservation(pair):
    _, dst, rx, _ = pair
    rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    data = torch.ones(2, 1, BLOCK_SIZE, HEADS, DIM)
    calls = [lambda: rx.begin("r1", "other-key", secret="x"),  # would FAIL it if admitted
             lambda: rx.write("r1", 0, 0, data, secret="x"),
             lambda: rx.finish("r1", LAYERS, secret="x"),
             lambda: rx.sender_abort("r1", "forged", secret="x")]
    for call in calls:
        with pytest.raises(ChunkRejected) as e:
            call()
        assert e.value.code == "PERMISSION_DENIED"
    assert rx.status("r1") is TransferStatus.PENDING and rx.error("r1") == ""
    assert not dst.any()


class IdleStreams:
    """`n` Push streams to `address` that send nothing until closed."""

    def __init__(self, address: str, n: int) -> None:
        self.release = threading.Event()
        self.channels = [grpc.insecure_channel(address) for _ in range(n)]

        def nothing():
            self.release.wait(60)
            return
            yield  # a generator that yields nothing

        self.calls = [pb_grpc.KVTransferStub(c).Push.future(nothing(), timeout=60)
                      for c in self.channels]

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


@pytest.mark.parametrize("pair", [GRPC, GRPC_THREADED], indirect=True)
def test_idle_streams_do_not_delay_a_transfer(pair):
    src, dst, rx, tx = pair
    idle = IdleStreams(rx.address, 20)  # more than the old receiver had threads (16)
    try:
        time.sleep(0.5)  # let them all open
        assert not any(c.done() for c in idle.calls)
        start = time.monotonic()
        handle = tx.open(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30), SRC_IDS)
        for layer in range(LAYERS):
            handle.send_layer(layer)
        handle.finish(timeout=10)
        assert rx.wait("r1", 5) is TransferStatus.COMPLETE
        assert time.monotonic() - start < 3, "the transfer waited behind idle streams"
        assert torch.equal(dst[:, :, DST_IDS], src[:, :, SRC_IDS])
    finally:
        idle.close()


@pytest.mark.parametrize("pair", [("grpc", {"idle_timeout": 0.5}),
                                  ("grpc", {"idle_timeout": 0.5, "write_inline": False})],
                         indirect=True)
def test_a_stream_idle_past_the_timeout_is_cut(pair):
    src, _, rx, _ = pair
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    idle = IdleStreams(rx.address, 1)
    try:
        err = idle.calls[0].exception(timeout=5)
        assert err is not None and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no message" in err.details()
    finally:
        idle.close()
    # The rightful sender went quiet after its first chunk: its request FAILs at once
    # rather than waiting out the lease.
    release = threading.Event()

    def first_then_nothing():
        yield encode_chunk("r1", 0, 0, src[0, :, SRC_IDS], KEY, secret=sink.secret)
        release.wait(10)

    with grpc.insecure_channel(rx.address) as channel:
        call = pb_grpc.KVTransferStub(channel).Push.future(first_then_nothing(), timeout=10)
        assert rx.wait("r1", 5) is TransferStatus.FAILED
        release.set()
        assert call.exception(timeout=5).code() is grpc.StatusCode.DEADLINE_EXCEEDED
