"""The decode worker: reserves blocks for handed-off prompts, receives their KV, and runs
continuous batching over them, streaming tokens back. In colocated mode (and for prompts
the router decides not to disaggregate) it also prefills requests itself.

The handoff is a transaction: `reserve` (blocks + lease) -> the prefill worker writes KV
into them -> `generate_from_prefill` commits after the receiver confirms every layer
arrived, or aborts. An uncommitted reservation is freed on `abort` or when its lease
expires, so no path leaks a block or decodes from blocks that were not fully written.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_loop import EngineLoop, RecentIds
from pdserve.engine.executor.base import Executor
from pdserve.engine.kv_cache.block_manager import OutOfBlocksError
from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.engine.multi_connector import MultiConnector
from pdserve.engine.sampler import SampleResult
from pdserve.engine.sequence import Resume
from pdserve.kv_store.connector import StoreConnector, store_stats
from pdserve.kv_transfer import KVTransferError, TransferStatus
from pdserve.kv_transfer.push_receiver import PushReceiver
from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest, WorkerStats

if TYPE_CHECKING:  # pdserve.tls imports grpc, which the local transport never needs
    from pdserve.tls import TLSFiles

log = logging.getLogger("pdserve.decode")

_END = object()


class DecodeWorker:
    """Plain class behind the decode (and colocated) Ray actor."""

    def __init__(
        self,
        config: EngineConfig,
        transport: str = "grpc",
        worker_id: str = "decode-0",
        role: str = "decode",
        host: str = "127.0.0.1",
        transfer_timeout: float = 30.0,
        advertise_host: str | None = None,
        tls: TLSFiles | None = None,
        store: StoreConnector | None = None,
        executor: Executor | None = None,
    ):
        self.worker_id = worker_id
        self.role = role
        self.transfer_timeout = transfer_timeout
        # grpc (data) and nccl (announces): bind `host`; senders connect to `advertise_host`
        # (default `host`), which must be set when `host` is a wildcard such as 0.0.0.0.
        opts: dict = {"name": worker_id} if transport in ("local", "nccl") else {}
        if transport in ("grpc", "nccl"):
            opts.update(host=host, advertise_host=advertise_host)
        if tls is not None:  # the grpc receiver serves TLS (mutual when it asks for certs)
            opts["tls"] = tls
        # The KV connector: a reservation's tokens count as loaded once its receiver says
        # the prefill worker's push is COMPLETE.
        self.connector = PushReceiver(transport, **opts)
        # With the global KV store, requests prefilled here load their stored prefix first.
        # `executor`: the model over a rank group (tensor-parallel), default this process.
        self.store = store
        engine_connector = self.connector if store is None \
            else MultiConnector([self.connector, store])
        self.engine = LLMEngine(config, kv_connector=engine_connector, executor=executor)
        layout = self.engine.layout_key
        if role == "decode" and layout.tp_size * layout.pp_size > 1:
            # Handed-off KV: each follower rank receives its own heads of its stage's layers.
            self.connector.bind_ranks(self.engine.rank_kv_control)
        self.receiver = self.connector.receiver
        self._streams: dict[str, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self.leases_expired = 0
        self._aborted = RecentIds()  # touched on the loop thread only
        self.loop = EngineLoop(self.engine, self._on_outputs, on_idle=self._expire_leases)
        if store is not None:
            store.on_saved = self.loop.wake  # saved blocks may be freed
        self.loop.start()

    @property
    def compat_key(self) -> str:
        return self.engine.compat_key

    # ---- handoff ----------------------------------------------------------------------------

    def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int,
                lease_s: float = 30.0, prompt_token_ids: list[int] | None = None) -> KVSink:
        """Allocate blocks for a prompt's KV under a lease; returns the sink.

        With `prompt_token_ids`, the longest prefix of the prompt this worker has cached is
        reused, then (with the global KV store) the blocks after it that the store holds are
        loaded: the sink starts past both (its `first_block`), so the prefill worker sends
        only the rest."""

        self._check_working()

        def do(engine: LLMEngine) -> KVSink:
            try:
                res = engine.reserve(request_id, num_prompt_tokens, max_tokens,
                                     prompt_token_ids)
            except OutOfBlocksError as e:
                # Back-pressure, not a failure: the router waits and tries again.
                raise OutOfBlocksError(f"{self.worker_id}: {e}") from None
            try:
                if self.store is not None and prompt_token_ids is not None:
                    # Blocks the global KV store holds need not be sent either.
                    loaded = self.store.load_now(prompt_token_ids[:num_prompt_tokens],
                                                 res.first_new_block, res.new_block_ids)
                    if loaded:
                        res = engine.mark_loaded(request_id, loaded)
                sink = self.connector.expect(request_id, res.new_block_ids, num_prompt_tokens,
                                             time.time() + lease_s, res.first_new_block)
            except BaseException:
                engine.release(request_id)
                raise
            return sink

        return self.loop.call(do)

    def generate_from_prefill(self, request: WorkerRequest, first: PrefillResult
                              ) -> Iterator[OutputChunk]:
        """Commit a handed-off request and stream its output chunks (the first token's
        chunk first). Raises KVTransferError, freeing the reservation, if the KV did not
        fully arrive."""
        rid = request.request_id
        deadline = time.monotonic() + self.transfer_timeout
        status = self.receiver.wait(rid, self.transfer_timeout)
        if status is TransferStatus.COMPLETE and self.connector.has_ranks:
            status = self._wait_ranks(rid, deadline)
        if status is not TransferStatus.COMPLETE:
            self._drop_reservation(rid)
            raise KVTransferError(f"KV for {rid} did not arrive ({status.name})")
        params = request.params
        sample = SampleResult(first.token_id, first.logprob, list(first.top_logprobs))
        stream = self._open_stream(rid)

        def commit(engine: LLMEngine) -> RequestOutput:
            try:
                # The connector vouches for the pushed tokens (the receiver said COMPLETE).
                out = engine.adopt(rid, list(request.prompt_token_ids), params, params.seed,
                                   sample, first.cached_tokens, _resume(request))
            except KeyError:
                self.connector.cancel(rid)
                raise KVTransferError(f"reservation for {rid} was aborted or expired") from None
            except BaseException:
                self._free_reservation(rid)
                raise
            self.connector.cancel(rid)  # the receiver's part is done; the blocks are ours now
            # Queued here, on the engine thread: the next step's token (queued by
            # `_on_outputs` on this thread too) must not overtake the first one.
            stream.put(out)
            if out.finished:
                stream.put(_END)
            return out

        try:
            self.loop.call(commit)
        except BaseException:
            self._close_stream(rid)
            raise
        yield from self._drain(rid, stream)

    def generate(self, request: WorkerRequest) -> Iterator[OutputChunk]:
        """Prefill and decode a request here (colocated mode); streams output chunks. A
        resumed request recomputes its streamed tokens' KV with the prompt, then continues."""
        rid, params = request.request_id, request.params
        self._check_working()
        stream = self._open_stream(rid)

        def add(engine: LLMEngine) -> None:
            if self._aborted.pop(rid):  # on the loop thread, as `abort` notes it
                raise KVTransferError(f"request {rid} was aborted before it came")
            engine.add_request(rid, list(request.prompt_token_ids), params, _resume(request))

        try:
            self.loop.call(add)
        except BaseException:
            self._close_stream(rid)
            raise
        yield from self._drain(rid, stream)

    def renew(self, request_id: str, lease_s: float) -> bool:
        """Extend an uncommitted reservation's lease to `lease_s` from now (the router does
        it while the prefill for it is still running); False if it is gone already."""
        return self.receiver.renew(request_id, time.time() + lease_s)

    def abort(self, request_id: str) -> bool:
        """Abort a request in any state: reserved, decoding or unknown (a no-op)."""

        def do(engine: LLMEngine) -> bool:
            dropped = self._free_reservation(request_id)
            aborted = engine.abort(request_id)
            if not (dropped or aborted):
                # A `generate` call may still be on its way (Ray runs an actor's calls on
                # several threads, so this abort can overtake it): it is refused when it
                # comes. (A reservation is never made after its abort: the router awaits it.)
                self._aborted.add(request_id)
            return dropped or aborted

        found = self.loop.call(do)
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(RequestOutput(request_id, [], "", finished=True, finish_reason="abort"))
            stream.put(_END)
        return found

    @property
    def failure(self) -> str | None:
        """Why this worker can serve nothing more (its rank group broke), or None."""
        reason = self.engine.executor.failure
        return f"{self.worker_id} failed: {reason}" if reason else None

    def _check_working(self) -> None:
        if self.failure:
            raise RuntimeError(self.failure)

    def stats(self) -> WorkerStats:
        usage = self.engine.usage()
        return WorkerStats(
            worker_id=self.worker_id,
            role=self.role,
            # A failed worker has no block a new request could get: routing goes elsewhere.
            free_blocks=0 if self.failure else usage.free_blocks,
            total_blocks=usage.total_blocks,
            running=usage.running,
            waiting=usage.waiting + usage.reserved,
            prompt_tokens=self.engine.stats["prompt_tokens"],
            generated_tokens=self.engine.stats["generated_tokens"],
            leases_expired=self.leases_expired,
            **store_stats(self.store),
            tp=self.engine.layout_key.tp_size,
            pp=self.engine.layout_key.pp_size,
            preemptions=usage.preemptions,
            preempted_tokens=usage.preempted_tokens,
            solo_steps=usage.solo_steps,
            rank_failure=self.engine.executor.failure or "",
        )

    def close(self) -> None:
        self.loop.stop()
        self.connector.close()
        if self.store is not None:
            self.store.close()
        self.engine.shutdown()  # releases a rank group's followers

    # ---- internals ----------------------------------------------------------------------------

    def _open_stream(self, rid: str) -> queue.SimpleQueue:
        stream: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._streams[rid] = stream
        return stream

    def _close_stream(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def _drain(self, rid: str, stream: queue.SimpleQueue) -> Iterator[OutputChunk]:
        """Yield coalesced chunks until the request finishes; abort it if the consumer
        goes away first (the router closed the stream: client cancel)."""
        finished = False
        try:
            while not finished:
                outs = [stream.get()]
                while True:
                    try:
                        outs.append(stream.get_nowait())
                    except queue.Empty:
                        break
                chunk = OutputChunk.merge(OutputChunk.from_output(o) for o in outs
                                          if o is not _END)
                finished = chunk.finished or any(o is _END for o in outs)
                if chunk.finish_reason == "abort" and self.failure:
                    # Not a cancel: the step failed under the request. Say why.
                    raise RuntimeError(self.failure)
                if not chunk.empty:
                    yield chunk
        finally:
            self._close_stream(rid)
            if not finished:
                self.abort(rid)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        stream.put(_END)

    def _free_reservation(self, rid: str) -> bool:
        """On the loop thread: forget an uncommitted reservation and free its blocks (no
        byte lands in them once the receiver forgot it)."""
        self.connector.cancel(rid)
        return self.engine.release(rid)

    def _wait_ranks(self, rid: str, deadline: float) -> TransferStatus:
        """Until every follower rank's part of `rid` arrived (its prefill ranks push
        independently), failed, or `deadline`; asked on the loop thread (it uses the rank
        group), backing off from 5 ms."""
        delay = 0.005
        while True:
            status = self.loop.call(lambda e: self.connector.rank_status(rid))
            if status is not TransferStatus.PENDING or time.monotonic() > deadline:
                return status
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _drop_reservation(self, rid: str) -> None:
        self.loop.call(lambda engine: self._free_reservation(rid))

    def _expire_leases(self, engine: LLMEngine) -> None:
        for rid in self.receiver.expire(time.time()):
            if self._free_reservation(rid):
                self.leases_expired += 1
                log.warning("lease for %s expired before commit; freed its blocks", rid)


def _resume(request: WorkerRequest) -> Resume | None:
    if not request.resumed_token_ids:
        return None
    return Resume(request.resumed_token_ids, request.resumed_chars)
