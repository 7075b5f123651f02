"""KV handoff between two pools over real loopback gRPC and the in-process transport."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from pdserve.engine.kv_cache.block_hash import hash_blocks
from pdserve.engine.kv_cache.block_manager import BlockManager
from pdserve.engine.kv_cache.layout import KVLayout
from pdserve.kv_transfer import (
    IncompatibleKVError,
    KVSink,
    KVTransferError,
    TransferStatus,
    make_receiver,
    make_sender,
)
from pdserve.kv_transfer.wire import encode_chunk, pb, pb_grpc

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 4, 32, 16, 2, 8
SRC_IDS = [3, 17, 8, 25]  # non-contiguous, out of order
DST_IDS = [30, 2, 11, 19]
NUM_TOKENS = 60  # 4 blocks of 16, the last one partly filled
KEY = "compat-a"
TRANSPORTS = ["grpc", "local"]
# torch.frombuffer over a protobuf `bytes` warns once per process that the buffer is
# read-only; kv_transfer.wire only reads it and filters the warning, but pytest resets filters.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def layout(dtype: str = "float32") -> KVLayout:
    return KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, dtype)


@pytest.fixture
def make_pair():
    """make_pair(transport, dtype, rx_key, tx_key, **sender_opts) -> (src, dst, rx, tx)."""
    made = []

    def make(transport: str, dtype: str = "float32", rx_key: str = KEY, tx_key: str = KEY,
             **sender_opts):
        gen = torch.Generator().manual_seed(0)
        dst = layout(dtype).allocate(BLOCKS, "cpu")
        src = torch.randn(dst.shape, generator=gen).to(dst.dtype)
        rx = make_receiver(transport, dst, rx_key)
        tx = make_sender(transport, src, tx_key, **sender_opts)
        made.append((rx, tx))
        return src, dst, rx, tx

    yield make
    for rx, tx in made:
        tx.close()
        rx.close()


def untouched_outside(dst: torch.Tensor, dst_ids: list[int]) -> bool:
    others = [b for b in range(BLOCKS) if b not in dst_ids]
    return bool((dst[:, :, others] == 0).all())


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so equality is exact even for bf16 and -0.0."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def wait_until(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def send_all(handle, layers=range(LAYERS)) -> None:
    for layer in layers:
        handle.send_layer(layer)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_handoff_copies_blocks_bit_for_bit(make_pair, transport, dtype):
    src, dst, rx, tx = make_pair(transport, dtype)
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    # The sink crosses processes as JSON in production.
    sink = KVSink.from_dict(json.loads(json.dumps(sink.to_dict())))
    assert rx.status("r1") is TransferStatus.PENDING
    handle = tx.open(sink, SRC_IDS)
    send_all(handle)
    handle.finish(timeout=10)
    assert rx.wait("r1", timeout=10) is TransferStatus.COMPLETE
    assert torch.equal(bits(dst[:, :, DST_IDS]), bits(src[:, :, SRC_IDS]))
    assert untouched_outside(dst, DST_IDS)


def test_layer_split_into_several_chunks(make_pair):
    src, dst, rx, tx = make_pair("grpc", chunk_bytes=1)  # one block per chunk
    handle = tx.open(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30), SRC_IDS)
    send_all(handle)
    handle.finish(timeout=10)
    assert rx.wait("r1", 10) is TransferStatus.COMPLETE
    assert rx.chunks_written == LAYERS * len(DST_IDS)
    assert torch.equal(dst[:, :, DST_IDS], src[:, :, SRC_IDS])
    assert untouched_outside(dst, DST_IDS)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sender_refuses_mismatched_compat_key(make_pair, transport):
    _, dst, rx, tx = make_pair(transport, tx_key="compat-b")
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    with pytest.raises(IncompatibleKVError, match="compat-b"):
        tx.open(sink, SRC_IDS)
    assert rx.status("r1") is TransferStatus.PENDING
    assert not dst.any()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receiver_refuses_mismatched_compat_key(make_pair, transport):
    _, dst, rx, tx = make_pair(transport, tx_key="compat-b")
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    # A sink that lies about the receiver's key gets past the sender's own check.
    handle = tx.open(dataclasses.replace(sink, compat_key="compat-b"), SRC_IDS)
    send_all(handle)
    with pytest.raises(IncompatibleKVError, match="compat-a"):
        handle.finish(timeout=10)
    assert rx.wait("r1", 5) is TransferStatus.FAILED
    assert not dst.any()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_abort_fails_request_and_later_chunks_are_dropped(make_pair, transport):
    src, dst, rx, tx = make_pair(transport)
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30)
    handle = tx.open(sink, SRC_IDS)
    send_all(handle, [0, 1])
    handle.abort()
    assert rx.wait("r1", 5) is TransferStatus.FAILED
    assert torch.equal(dst[:2, :, DST_IDS], src[:2, :, SRC_IDS])  # what came before stays
    late = tx.open(sink, SRC_IDS)  # a straggler for the same request
    send_all(late, [2, 3])
    with pytest.raises(KVTransferError):
        late.finish(timeout=10)
    assert not dst[2:].any()
    rx.cancel("r1")
    assert rx.status("r1") is TransferStatus.UNKNOWN


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_mid_transfer_stops_writes(make_pair, transport):
    src, dst, rx, tx = make_pair(transport)
    handle = tx.open(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30), SRC_IDS)
    send_all(handle, [0, 1])
    wait_until(lambda: rx.layers_received("r1") == 2)
    rx.cancel("r1")  # decode side gives up; its blocks may be reused from here on
    assert rx.status("r1") is TransferStatus.UNKNOWN
    send_all(handle, [2, 3])
    with pytest.raises(KVTransferError, match="NOT_FOUND"):
        handle.finish(timeout=10)
    assert torch.equal(dst[:2, :, DST_IDS], src[:2, :, SRC_IDS])
    assert not dst[2:].any()
    assert untouched_outside(dst, DST_IDS)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_expire_drops_pending_reservations_past_deadline(make_pair, transport):
    src, dst, rx, tx = make_pair(transport)
    now = time.time()
    done_sink = rx.expect("done", [0], BLOCK_SIZE, now + 30)
    handle = tx.open(done_sink, [0])
    send_all(handle)
    handle.finish(timeout=10)
    sink = rx.expect("late", DST_IDS, NUM_TOKENS, now + 30)
    assert rx.expire(now) == []
    assert rx.expire(now + 60) == ["late"]  # the COMPLETE one is the decode worker's to commit
    assert rx.status("late") is TransferStatus.UNKNOWN
    assert rx.status("done") is TransferStatus.COMPLETE
    handle = tx.open(sink, SRC_IDS)
    send_all(handle)
    with pytest.raises(KVTransferError):
        handle.finish(timeout=10)
    assert not dst[:, :, DST_IDS].any()


def _push(address: str, chunks: list) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.KVTransferStub(channel).Push(iter(chunks), timeout=10)
    return err.value


def test_malformed_chunks_are_rejected_and_write_nothing(make_pair):
    src, dst, rx, _ = make_pair("grpc")
    good = src[0].index_select(1, torch.tensor(SRC_IDS[:2]))
    cases = {
        "short": (encode_chunk("short", 0, 0, good, KEY), "bytes"),
        "range": (encode_chunk("range", 0, 3, good, KEY), "outside the reservation"),
        "layer": (encode_chunk("layer", LAYERS, 0, good, KEY), "layer 4 outside"),
        "dtype": (encode_chunk("dtype", 0, 0, good.to(torch.bfloat16), KEY), "dtype"),
    }
    cases["short"][0].data = cases["short"][0].data[:-4]
    for rid, (chunk, message) in cases.items():
        # The rightful sender (it holds the secret) sends something malformed.
        chunk.secret = rx.expect(rid, DST_IDS, NUM_TOKENS, time.time() + 30).secret
        err = _push(rx.address, [chunk])
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, rid
        assert message in err.details(), rid
        assert rx.status(rid) is TransferStatus.FAILED
    err = _push(rx.address, [encode_chunk("nobody", 0, 0, good, KEY)])
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert not dst.any()
    assert rx.chunks_written == 0


def test_unreachable_receiver_fails_fast(make_pair):
    _, _, rx, tx = make_pair("grpc")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = dataclasses.replace(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30),
                               address=f"127.0.0.1:{port}")
    handle = tx.open(sink, SRC_IDS)
    send_all(handle)
    start = time.monotonic()
    with pytest.raises(KVTransferError, match="UNAVAILABLE"):
        handle.finish(timeout=5)
    assert time.monotonic() - start < 5


def test_silent_receiver_times_out(make_pair):
    _, _, rx, tx = make_pair("grpc")
    release = threading.Event()

    class Silent(pb_grpc.KVTransferServicer):
        def Push(self, request_iterator, context):  # noqa: N802
            release.wait(10)
            return pb.PushAck()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_KVTransferServicer_to_server(Silent(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        sink = dataclasses.replace(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30),
                                   address=f"127.0.0.1:{port}")
        handle = tx.open(sink, SRC_IDS)
        send_all(handle)
        start = time.monotonic()
        with pytest.raises(KVTransferError, match="no acknowledgement"):
            handle.finish(timeout=0.5)
        assert time.monotonic() - start < 3
    finally:
        release.set()
        server.stop(0)


def test_local_sender_to_unknown_receiver_fails(make_pair):
    _, _, rx, tx = make_pair("local")
    sink = dataclasses.replace(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30),
                               address="nobody")
    handle = tx.open(sink, SRC_IDS)
    send_all(handle)
    with pytest.raises(KVTransferError, match="nobody"):
        handle.finish(timeout=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_concurrent_requests_into_one_receiver(make_pair, transport):
    opts = {"chunk_bytes": 1} if transport == "grpc" else {}  # many small chunks interleave
    src, dst, rx, tx = make_pair(transport, **opts)
    plans = {"a": ([3, 17], [30, 2]), "b": ([8, 25], [11, 19])}
    handles = {rid: tx.open(rx.expect(rid, d, 2 * BLOCK_SIZE, time.time() + 30), s)
               for rid, (s, d) in plans.items()}

    def run(rid: str) -> None:
        for layer in range(LAYERS):  # interleave with the other request's layers
            handles[rid].send_layer(layer)
            time.sleep(0.005)
        handles[rid].finish(timeout=10)

    threads = [threading.Thread(target=run, args=(rid,)) for rid in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for rid, (s, d) in plans.items():
        assert rx.wait(rid, 5) is TransferStatus.COMPLETE
        assert torch.equal(dst[:, :, d], src[:, :, s])
    assert untouched_outside(dst, DST_IDS)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_finish_before_every_layer_fails_both_sides(make_pair, transport):
    _, _, rx, tx = make_pair(transport)
    handle = tx.open(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30), SRC_IDS)
    send_all(handle, [0, 1, 2])
    with pytest.raises(KVTransferError, match=r"layers \[3\]"):
        handle.finish(timeout=5)
    assert rx.wait("r1", 5) is TransferStatus.FAILED


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("first_block", [1, 3])
def test_sink_from_a_later_block_moves_only_those_blocks(make_pair, transport, first_block):
    """The decode side holds the first blocks (its cached prefix): only the rest travel."""
    src, dst, rx, tx = make_pair(transport)
    dst_ids = DST_IDS[first_block:]
    sink = rx.expect("r1", dst_ids, NUM_TOKENS, time.time() + 30, first_block=first_block)
    sink = KVSink.from_dict(json.loads(json.dumps(sink.to_dict())))
    assert sink.first_block == first_block and sink.num_tokens == NUM_TOKENS
    handle = tx.open(sink, SRC_IDS)  # the sender names every block of the request
    send_all(handle)
    handle.finish(timeout=10)
    assert rx.wait("r1", 10) is TransferStatus.COMPLETE
    assert rx.chunks_written == LAYERS  # one chunk a layer, of the later blocks only
    assert torch.equal(dst[:, :, dst_ids], src[:, :, SRC_IDS[first_block:]])
    assert untouched_outside(dst, dst_ids)


def test_start_block_counts_are_checked_on_both_sides(make_pair):
    src, dst, rx, tx = make_pair("local")
    with pytest.raises(ValueError, match="need 2 blocks of 16 after the first 2"):
        rx.expect("r", DST_IDS[1:], NUM_TOKENS, time.time() + 30, first_block=2)
    with pytest.raises(ValueError, match="nothing is left to send"):
        rx.expect("r", [5], NUM_TOKENS, time.time() + 30, first_block=4)
    sink = rx.expect("r", DST_IDS[2:], NUM_TOKENS, time.time() + 30, first_block=2)
    with pytest.raises(ValueError, match="2 source blocks for 2 sink blocks from block 2"):
        tx.open(sink, SRC_IDS[2:])  # only the sent blocks: the request's others are missing
    with pytest.raises(ValueError, match="first_block"):
        dataclasses.replace(sink, first_block=-1)
    assert rx.status("r") is TransferStatus.PENDING and not dst.any()


def _prefix_cached_pools(transport: str, make_pair, first_block: int):
    """Two block managers over the pair's pools; the decode side already holds the prompt's
    first `first_block` blocks in its prefix cache, the prefill side holds nothing."""
    src, dst, rx, tx = make_pair(transport)
    p_blocks, d_blocks = BlockManager(BLOCKS, BLOCK_SIZE), BlockManager(BLOCKS, BLOCK_SIZE)
    tokens = list(range(NUM_TOKENS))
    hashes = hash_blocks(tokens, BLOCK_SIZE, KEY)
    earlier = d_blocks.allocate(first_block)
    for b, h in zip(earlier, hashes):
        d_blocks.commit_hash(b, h)
    d_blocks.free(reversed(earlier))
    start = (p_blocks.num_free_blocks, d_blocks.num_free_blocks)
    cached = d_blocks.match_prefix(hashes[:first_block])
    assert cached == earlier
    need = -(-NUM_TOKENS // BLOCK_SIZE)
    fresh = d_blocks.allocate(need - first_block)
    src_ids = p_blocks.allocate(need)
    sink = rx.expect("r1", fresh, NUM_TOKENS, time.time() + 30, first_block=first_block)
    return src, dst, rx, tx, p_blocks, d_blocks, start, cached + fresh, src_ids, sink


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("outcome", ["commit", "abort"])
def test_prefix_reuse_frees_every_block_on_both_sides(make_pair, transport, outcome):
    """Reserve past a cached prefix, transfer, then commit (and finish) or abort: the free
    block counts on both sides come back to where they started, and the cached prefix
    blocks were never written by the transfer."""
    src, dst, rx, tx, p_blocks, d_blocks, start, d_ids, src_ids, sink = \
        _prefix_cached_pools(transport, make_pair, first_block=2)
    before_prefix = dst[:, :, d_ids[:2]].clone()
    handle = tx.open(sink, src_ids)
    if outcome == "commit":
        send_all(handle)
        handle.finish(timeout=10)
        assert rx.wait("r1", 10) is TransferStatus.COMPLETE
        assert torch.equal(dst[:, :, d_ids[2:]], src[:, :, src_ids[2:]])
    else:
        send_all(handle, [0])
        handle.abort()
        assert rx.wait("r1", 10) is TransferStatus.FAILED
    rx.cancel("r1")
    assert torch.equal(dst[:, :, d_ids[:2]], before_prefix)
    p_blocks.free(reversed(src_ids))  # prefill side: after the ack, or at once on abort
    d_blocks.free(reversed(d_ids))  # decode side: request finished, or reservation dropped
    assert (p_blocks.num_free_blocks, d_blocks.num_free_blocks) == start == (BLOCKS, BLOCKS)
    assert d_blocks.num_cached_blocks == 2  # the prefix stays cached for the next request


def test_sink_round_trip_and_validation(make_pair):
    _, _, rx, _ = make_pair("local")
    sink = rx.expect("r1", DST_IDS, NUM_TOKENS, 123.5)
    assert KVSink.from_dict(sink.to_dict()) == sink
    with pytest.raises(ValueError, match="exactly"):
        KVSink.from_dict({**sink.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="need 4 blocks"):
        rx.expect("r2", DST_IDS[:3], NUM_TOKENS, 123.5)
    with pytest.raises(ValueError, match="outside the pool"):
        rx.expect("r3", [0, 1, 2, BLOCKS], NUM_TOKENS, 123.5)
    with pytest.raises(ValueError, match="already"):
        rx.expect("r1", DST_IDS, NUM_TOKENS, 123.5)


def test_package_imports_no_ray_redis_or_workers():
    code = ("import sys, kv_transfer, kv_transfer.grpc_transport, kv_transfer.local_transport; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'redis', 'prefill_worker', 'decode_worker', 'router', 'kv_store')]; "
            "print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("devices", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_handoff_with_cuda_pools(transport, devices):
    dst = layout("bfloat16").allocate(BLOCKS, devices[1])
    src = torch.randn(dst.shape, device=devices[0]).to(dst.dtype)
    want = src[:, :, SRC_IDS].cpu()
    rx, tx = make_receiver(transport, dst, KEY), make_sender(transport, src, KEY)
    try:
        handle = tx.open(rx.expect("r1", DST_IDS, NUM_TOKENS, time.time() + 30), SRC_IDS)
        for layer in range(LAYERS):
            handle.send_layer(layer)
            src[layer].fill_(7)  # the next forward pass reuses the blocks at once
        handle.finish(timeout=10)
        assert rx.wait("r1", 10) is TransferStatus.COMPLETE
        assert torch.equal(bits(dst[:, :, DST_IDS].cpu()), bits(want))
        assert untouched_outside(dst.cpu(), DST_IDS)
    finally:
        tx.close()
        rx.close()
