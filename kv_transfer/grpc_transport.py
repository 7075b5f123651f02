"""The `grpc` transport: KV bytes over HTTP/2, any host, CPU or GPU pools.

One `Push` stream carries one request: data chunks (a layer split into block ranges of at
most `chunk_bytes`), then a closing `done` or `abort`. The receiver validates every chunk
before writing it and answers a refusal with a gRPC status (NOT_FOUND unknown/cancelled
request, INVALID_ARGUMENT malformed chunk, FAILED_PRECONDITION compatibility key mismatch,
ABORTED request no longer pending); any refusal or a stream cut short marks the request
FAILED, so decode never waits out the lease for a transfer that cannot finish.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc
import torch

from pdserve.kv_transfer.base import (
    FanOutHandle,
    HeadRoute,
    KVSender,
    KVSink,
    KVTransferError,
    LayerTracker,
    SendHandle,
)
from pdserve.kv_transfer.receiver import BlockReceiver, ChunkRejected, transfer_error
from pdserve.kv_transfer.wire import (
    DEFAULT_CHUNK_BYTES,
    closing_chunk,
    decode_chunk,
    encode_chunk,
    grpc_options,
    pb,
    pb_grpc,
)

_DONE, _ABORT = object(), object()


def _block_layer_bytes(pool: torch.Tensor) -> int:
    """Bytes of one block's K and V for one layer: the smallest unit a chunk carries."""
    return 2 * math.prod(pool.shape[3:]) * pool.element_size()


def _host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class GrpcKVReceiver(BlockReceiver):
    """A receiver listening on `host:port` (loopback and a free port by default)."""

    transport = "grpc"

    def __init__(self, pool: torch.Tensor, compat_key: str, host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None, max_workers: int = 16,
                 max_chunk_bytes: int = 4 * DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(pool, compat_key)
        # Each open stream holds one worker thread for its duration: max_workers bounds the
        # number of transfers into this worker that progress at once.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers, thread_name_prefix="kv-recv"),
            options=grpc_options(max(max_chunk_bytes, _block_layer_bytes(pool))),
        )
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(self), self._server)
        bound = self._server.add_insecure_port(_host_port(host, port))
        if not bound:
            raise OSError(f"cannot listen for KV transfers on {host}:{port}")
        self._server.start()
        self._address = _host_port(advertise_host or host, bound)

    @property
    def address(self) -> str:
        return self._address

    def close(self) -> None:
        self._server.stop(grace=1.0).wait()


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver: GrpcKVReceiver) -> None:
        self.receiver = receiver

    def Push(self, request_iterator: Iterator[pb.KVChunk],  # noqa: N802 (gRPC method name)
             context: grpc.ServicerContext) -> pb.PushAck:
        rx, request_id, closed = self.receiver, None, False
        heads, cells = None, 0  # this stream's share of the heads, and blocks x heads written
        try:
            for chunk in request_iterator:
                if request_id is None:
                    request_id = chunk.request_id
                    rx.begin(request_id, chunk.compat_key)
                elif chunk.request_id != request_id:
                    raise ChunkRejected("INVALID_ARGUMENT",
                                        f"stream for request {request_id} carried a chunk for "
                                        f"{chunk.request_id}; one stream carries one request")
                if chunk.abort:
                    closed = True
                    rx.fail(request_id, "aborted by the sender")
                    return pb.PushAck(request_id=request_id, error="aborted")
                if chunk.done:
                    closed = True
                    part = (heads is not None
                            and cells == chunk.num_layers * rx.reserved_blocks(request_id))
                    rx.finish(request_id, chunk.num_layers, part_complete=part)
                    return pb.PushAck(request_id=request_id, complete=True,
                                      layers_received=rx.layers_received(request_id))
                data = decode_chunk(chunk)
                span = (chunk.first_head, chunk.first_head + data.shape[3])
                if heads is not None and span != heads:
                    raise ChunkRejected("INVALID_ARGUMENT",
                                        f"request {request_id}: one stream carries one range "
                                        f"of heads, got {span} after {heads}")
                rx.write(request_id, chunk.layer, chunk.first_block, data, chunk.first_head)
                heads, cells = span, cells + chunk.num_blocks
        except ChunkRejected as e:
            context.abort(grpc.StatusCode[e.code], str(e))
        finally:
            if request_id is not None and not closed:
                rx.fail(request_id, "the stream ended before the sender's done")
        context.abort(grpc.StatusCode.ABORTED, f"stream for {request_id} ended without done")


class GrpcKVSender(KVSender):
    """Opens `Push` streams; one pooled channel per destination address."""

    transport = "grpc"

    def __init__(self, pool: torch.Tensor, compat_key: str,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__(pool, compat_key, tp_rank, tp_size)
        unit = _block_layer_bytes(pool)
        self.blocks_per_chunk = max(1, chunk_bytes // unit)
        self._options = grpc_options(max(chunk_bytes, unit)) + [
            # A receiver that restarts on the same address is found again within seconds.
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def open(self, sink: KVSink, src_block_ids: Sequence[int]) -> SendHandle:
        """One `Push` stream per receiving rank that holds any of this rank's heads (one
        stream, all heads, when both sides hold the same heads)."""
        self.check_sink(sink, src_block_ids)
        routes = self.routes(sink)
        src = self.source_index(self.blocks_to_send(sink, src_block_ids))
        parts = [GrpcSendHandle(self._stub(r.address), sink, self.pool, src, self.compat_key,
                                self.blocks_per_chunk, r) for r in routes]
        return parts[0] if len(parts) == 1 else FanOutHandle(sink.request_id, parts)

    def _stub(self, address: str) -> pb_grpc.KVTransferStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(address, options=self._options)
                self._channels[address] = channel
        return pb_grpc.KVTransferStub(channel)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


class GrpcSendHandle(SendHandle):
    """One request's `Push` stream; gRPC's request thread serializes and sends the queue."""

    def __init__(self, stub: pb_grpc.KVTransferStub, sink: KVSink, pool: torch.Tensor,
                 src: torch.Tensor, compat_key: str, blocks_per_chunk: int,
                 route: HeadRoute | None = None) -> None:
        self.request_id = sink.request_id
        self._sink, self._src = sink, src
        self._route = route or HeadRoute(sink.address, 0, pool.shape[4], 0)
        self._address = self._route.address
        r = self._route
        # The heads this stream carries (a view; each layer's snapshot copies them).
        self._pool = pool if r.count == pool.shape[4] else pool[..., r.first:r.first + r.count, :]
        self._compat_key = compat_key
        self._bpc = blocks_per_chunk
        self._tracker = LayerTracker(sink.request_id, pool.shape[0])
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # The stream lives at most until the lease ends; the receiver drops it after that.
        self._future = stub.Push.future(self._requests(),
                                        timeout=max(0.0, sink.deadline - time.time()))

    def send_layer(self, layer: int) -> None:
        self._tracker.claim(layer)
        n = self._src.numel()
        for first in range(0, n, self._bpc):
            # index_select copies, so the pool may be overwritten once this returns (CPU) or
            # once later kernels on this stream run (GPU: the copies are ordered before them).
            snap = self._pool[layer].index_select(1, self._src[first:first + self._bpc])
            event = None
            if snap.is_cuda:
                host = torch.empty(snap.shape, dtype=snap.dtype, pin_memory=True)
                host.copy_(snap, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                snap = host
            self._queue.put((layer, first, snap, event))

    def finish(self, timeout: float | None = None) -> None:
        self._tracker.close()
        missing = self._tracker.missing()
        if missing:
            self._queue.put(_ABORT)
            raise KVTransferError(f"request {self.request_id}: finish before layers {missing}")
        self._queue.put(_DONE)
        try:
            ack = self._future.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self._future.cancel()
            raise KVTransferError(f"request {self.request_id}: no acknowledgement from "
                                  f"{self._address} within {timeout} s") from None
        except grpc.FutureCancelledError:
            raise KVTransferError(f"request {self.request_id}: transfer cancelled") from None
        except grpc.RpcError as e:
            raise transfer_error(e.code().name,
                                 f"{self._address}: {e.details()}") from None
        if not ack.complete:
            raise KVTransferError(f"request {self.request_id}: receiver did not complete it "
                                  f"({ack.error or 'no reason given'})")

    def abort(self) -> None:
        if not self._tracker.closed:
            self._tracker.close()
            self._queue.put(_ABORT)

    def _requests(self) -> Iterator[pb.KVChunk]:
        key = self._compat_key  # sent on the first message only
        while True:
            try:
                item = self._queue.get(timeout=max(0.01, self._sink.deadline - time.time()))
            except queue.Empty:
                return  # the lease is over: end the stream; the receiver marks it FAILED
            if item is _DONE or item is _ABORT:
                yield closing_chunk(self.request_id, len(self._tracker.sent),
                                    abort=item is _ABORT, compat_key=key)
                return
            layer, first, snap, event = item
            if event is not None:
                event.synchronize()
            yield encode_chunk(self.request_id, layer, first, snap, compat_key=key,
                               first_head=self._route.dst_first)
            key = ""


SENDER, RECEIVER = GrpcKVSender, GrpcKVReceiver  # picked up by kv_transfer.registry
