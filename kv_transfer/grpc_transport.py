"""The `grpc` transport: KV bytes over HTTP/2, any host, CPU or GPU pools.

One `Push` stream carries one request: data chunks (a layer split into block ranges of at
most `chunk_bytes`), then a closing `done` or `abort`. Every message carries the sink's
secret: a stream whose first message lacks it is refused (PERMISSION_DENIED) without
touching the reservation. The receiver validates every chunk before writing it and answers
a refusal with a gRPC status (NOT_FOUND unknown/cancelled request, INVALID_ARGUMENT
malformed chunk, FAILED_PRECONDITION compatibility key mismatch, ABORTED request no longer
pending, DEADLINE_EXCEEDED a stream idle past the receiver's `idle_timeout`); any refusal
or a stream cut short marks the request FAILED — when the stream had proved the secret —
so decode never waits out the lease for a transfer that cannot finish.
"""

from __future__ import annotations

import asyncio
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
from pdserve.tls import TLSFiles, add_port, secure_channel

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
    """A receiver listening on `host:port` (loopback and a free port by default).

    The listener is a grpc.aio server on its own event-loop thread, not a thread-per-stream
    server: with threads, every open stream holds a thread for as long as its peer keeps it
    open, so a few idle streams (anyone can open them; the secret is only seen in their
    first message) took every thread and starved real transfers. Here a waiting stream
    costs a coroutine; a received chunk is written into the pool on the loop (CPU pools) or
    on one of `write_threads` threads (GPU pools). A stream that sends nothing for
    `idle_timeout` seconds is cut (a real sender's gaps are one forward pass long), and at
    most `max_streams` streams are open at once (more are refused with RESOURCE_EXHAUSTED),
    which bounds what idle peers can hold. `tls` (pdserve.tls.TLSFiles) serves TLS, mutual
    when it requires client certificates.
    """

    transport = "grpc"

    def __init__(self, pool: torch.Tensor, compat_key: str, host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None, write_threads: int = 4,
                 max_chunk_bytes: int = 4 * DEFAULT_CHUNK_BYTES, idle_timeout: float = 10.0,
                 max_streams: int = 1024, tls: TLSFiles | None = None,
                 write_inline: bool | None = None) -> None:
        super().__init__(pool, compat_key)
        self.idle_timeout = idle_timeout
        # A CPU pool's write is a memcpy under locks held only for moments: done on the loop
        # itself, it saves a thread hop per message (which, on a busy CPU, is what a
        # transfer waits for most).
        # (`write_inline` overrides the choice: tests take the GPU pools' path on a CPU.)
        self.write_inline = not pool.is_cuda if write_inline is None else write_inline
        self.writers = futures.ThreadPoolExecutor(write_threads, thread_name_prefix="kv-recv")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-recv-loop",
                                        daemon=True)
        self._thread.start()
        options = grpc_options(max(max_chunk_bytes, _block_layer_bytes(pool)))
        try:
            bound = asyncio.run_coroutine_threadsafe(
                self._listen(_host_port(host, port), options, max_streams, tls),
                self._loop).result(60)
        except BaseException:
            self._stop_loop()
            raise
        if not bound:
            self._stop_loop()
            raise OSError(f"cannot listen for KV transfers on {host}:{port}")
        self._address = _host_port(advertise_host or host, bound)

    async def _listen(self, address: str, options: list, max_streams: int,
                      tls: TLSFiles | None) -> int:
        self._server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_streams)
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(self), self._server)
        bound = add_port(self._server, address, tls)
        if bound:
            await self._server.start()
        return bound

    @property
    def address(self) -> str:
        return self._address

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._server.stop(1.0), self._loop).result(10)
        finally:
            self._stop_loop()
            self.writers.shutdown(wait=False, cancel_futures=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()


class _Stream:
    """One Push stream's state: the request it carries once its first message proved the
    reservation's secret (`request_id` stays None until then), and whether it closed."""

    __slots__ = ("request_id", "closed", "heads", "layers", "cells")

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.closed = False
        # The stream's share of the receiving pool's heads (a tensor-parallel sender sends
        # only the heads both ranks hold), and how many blocks x layers of it were written.
        self.heads: tuple[int, int] | None = None
        # The layers it wrote (a pipeline stage's sender writes only its stage's).
        self.layers: set[int] = set()
        self.cells = 0


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver: GrpcKVReceiver) -> None:
        self.receiver = receiver

    async def Push(self, request_iterator, context: grpc.aio.ServicerContext  # noqa: N802
                   ) -> pb.PushAck:
        rx, stream = self.receiver, _Stream()
        loop = asyncio.get_running_loop()
        try:
            ack = await self._read(stream, context)
        except ChunkRejected as e:
            await loop.run_in_executor(rx.writers, self._cut, stream)
            await context.abort(grpc.StatusCode[e.code], str(e))
        except BaseException:  # cancelled (peer gone, server stopping): not awaited
            try:
                rx.writers.submit(self._cut, stream)
            except RuntimeError:  # the receiver is closing: nothing is waited on any more
                pass
            raise
        if ack is None:
            await loop.run_in_executor(rx.writers, self._cut, stream)
            await context.abort(grpc.StatusCode.ABORTED,
                                f"stream for {stream.request_id} ended without done")
        return ack

    async def _read(self, stream: _Stream, context: grpc.aio.ServicerContext
                    ) -> pb.PushAck | None:
        """Apply the stream's messages in order; the ack, or None when it ended early."""
        rx, loop = self.receiver, asyncio.get_running_loop()
        while True:
            try:
                # asyncio.timeout, not wait_for: no task is made per message.
                async with asyncio.timeout(rx.idle_timeout):
                    chunk = await context.read()
            except TimeoutError:
                raise ChunkRejected("DEADLINE_EXCEEDED", f"no message for {rx.idle_timeout} s "
                                    "on a KV stream") from None
            if chunk is grpc.aio.EOF:
                return None
            if rx.write_inline:
                ack = self._take(stream, chunk)
            else:
                # A GPU pool's write copies to the device and `finish` waits for the stream:
                # that runs on a writer thread (one message of a stream at a time), so the
                # loop keeps serving the other streams meanwhile.
                ack = await loop.run_in_executor(rx.writers, self._take, stream, chunk)
            if ack is not None:
                return ack

    def _cut(self, stream: _Stream) -> None:
        """A stream ended without its closing message: FAIL its request — only if the
        stream proved the secret (a stranger's stream must not fail someone's request)."""
        if stream.request_id is not None and not stream.closed:
            self.receiver.fail(stream.request_id, "the stream ended before the sender's done")

    def _take(self, stream: _Stream, chunk: pb.KVChunk) -> pb.PushAck | None:
        """Apply one message (on the loop, or a writer thread); the ack once the stream is
        closed."""
        rx, rid = self.receiver, chunk.request_id
        if stream.request_id is None:
            rx.begin(rid, chunk.compat_key, secret=chunk.secret)  # refuses before anything
            stream.request_id = rid
        elif rid != stream.request_id:
            raise ChunkRejected("INVALID_ARGUMENT",
                                f"stream for request {stream.request_id} carried a chunk for "
                                f"{rid}; one stream carries one request")
        if chunk.abort:
            rx.sender_abort(rid, "aborted by the sender", secret=chunk.secret)
            stream.closed = True
            return pb.PushAck(request_id=rid, error="aborted")
        if chunk.done:
            stream.closed = True
            # The closing chunk's `layer` is the first of the layers the stream sent.
            sent = range(chunk.layer, chunk.layer + chunk.num_layers)
            part = (stream.heads is not None and stream.layers == set(sent)
                    and stream.cells == chunk.num_layers * rx.reserved_blocks(rid))
            rx.finish(rid, chunk.num_layers, part_complete=part, secret=chunk.secret,
                      first_layer=chunk.layer)
            return pb.PushAck(request_id=rid, complete=True,
                              layers_received=rx.layers_received(rid))
        data = decode_chunk(chunk)
        span = (chunk.first_head, chunk.first_head + data.shape[3])
        if stream.heads is not None and span != stream.heads:
            raise ChunkRejected("INVALID_ARGUMENT",
                                f"request {rid}: one stream carries one range of heads, got "
                                f"{span} after {stream.heads}")
        rx.write(rid, chunk.layer, chunk.first_block, data, chunk.first_head,
                 secret=chunk.secret)
        stream.heads, stream.cells = span, stream.cells + chunk.num_blocks
        stream.layers.add(chunk.layer)
        return None


class GrpcKVSender(KVSender):
    """Opens `Push` streams; one pooled channel per destination address (TLS with `tls`)."""

    transport = "grpc"

    def __init__(self, pool: torch.Tensor, compat_key: str,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, tls: TLSFiles | None = None,
                 tp_rank: int = 0, tp_size: int = 1, first_layer: int = 0,
                 num_kv_heads: int | None = None) -> None:
        super().__init__(pool, compat_key, tp_rank, tp_size, first_layer, num_kv_heads)
        self._tls = tls  # TLS to the receivers (client certificate too under mutual TLS)
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
                                self.blocks_per_chunk, r, self.first_layer) for r in routes]
        return parts[0] if len(parts) == 1 else FanOutHandle(sink.request_id, parts)

    def _stub(self, address: str) -> pb_grpc.KVTransferStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = secure_channel(address, self._tls, self._options)
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
                 route: HeadRoute | None = None, first_layer: int = 0) -> None:
        self.request_id = sink.request_id
        self._first_layer = first_layer  # the model layer this pool's layer 0 holds
        self._sink, self._src = sink, src
        self._route = route or HeadRoute(sink.address, 0, pool.shape[4], 0)
        self._address = self._route.address
        r = self._route
        # The model layers this stream carries, and the model layer of the receiving pool's
        # layer 0: pool layer j goes out as the receiver's layer first_layer + j - dst_layer.
        self._layers = r.layers or (first_layer, first_layer + pool.shape[0])
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
        if not self._layers[0] <= self._first_layer + layer < self._layers[1]:
            return  # another receiving stage's layer
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
                lo, hi = self._layers
                yield closing_chunk(self.request_id, hi - lo, abort=item is _ABORT,
                                    compat_key=key, secret=self._sink.secret,
                                    first_layer=lo - self._route.dst_layer)
                return
            layer, first, snap, event = item
            if event is not None:
                event.synchronize()
            yield encode_chunk(self.request_id,
                               self._first_layer + layer - self._route.dst_layer, first, snap,
                               compat_key=key,
                               secret=self._sink.secret, first_head=self._route.dst_first)
            key = ""


SENDER, RECEIVER = GrpcKVSender, GrpcKVReceiver  # picked up by kv_transfer.registry
