"""The prefill worker: runs prompts (chunked, batched) and streams their KV to decode workers.

For each request it samples the first token with the request's seed, so disaggregated and
colocated runs agree, and sends every layer's KV blocks to the decode worker's reserved
blocks during the step that finishes the prompt — layer l leaves while layer l+1 computes.
Its own copy of the blocks is kept until the transfer is acknowledged, then freed (their
full blocks stay in the prefix cache for the next prompt with the same prefix).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence
from pdserve.kv_transfer import KVTransferError, SendHandle, make_sender
from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest, WorkerStats

log = logging.getLogger("pdserve.prefill")


@dataclass(slots=True)
class _Pending:
    sink: KVSink
    future: Future
    seq: Sequence | None = None
    handle: SendHandle | None = None
    result: PrefillResult | None = None
    opened_at: float = 0.0
    sampled_at: float = 0.0
    num_blocks: int = 0
    params: SamplingParams | None = None  # the request's own (not the one-token copy)


class PrefillWorker:
    """Plain class behind the prefill Ray actor (testable without Ray)."""

    def __init__(
        self,
        config: EngineConfig,
        transport: str = "grpc",
        worker_id: str = "prefill-0",
        transfer_timeout: float = 30.0,
        inject_transfer_failures: int = 0,
    ):
        self.worker_id = worker_id
        self.engine = LLMEngine(config, hold_blocks_on_finish=True)
        self.sender = make_sender(transport, self.engine.kv_cache, self.engine.compat_key)
        self.transfer_timeout = transfer_timeout
        # Test hook for fault-injection tests: the next N handoffs fail after sending.
        self._inject_failures = inject_transfer_failures
        self._pending: dict[str, _Pending] = {}
        self.handoffs = {"count": 0, "seconds": 0.0, "tail_seconds": 0.0, "bytes": 0}
        self._lock = threading.Lock()
        self._finishers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-finish")
        self.loop = EngineLoop(self.engine, self._on_outputs, layer_hook=self._layer_hook)
        self.loop.start()

    # ---- API (called from the actor's threads) ---------------------------------------------

    @property
    def compat_key(self) -> str:
        return self.engine.compat_key

    def prefill(self, request: WorkerRequest, sink: KVSink,
                timeout: float | None = None) -> PrefillResult:
        """Prefill `request` and hand its KV to `sink`; returns the first sampled token.

        `request.params.seed` is set by the router, so both sides draw the same random
        numbers. Raises KVTransferError if the handoff fails (blocks on both sides are freed
        by then on this side; the router aborts the reservation on the decode side).
        """
        rid, params = request.request_id, request.params
        # Only the first token is made here: the decode worker does the rest and owns stop
        # strings; min_tokens matters only as far as suppressing eos for this first token.
        local = replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=())
        pending = _Pending(sink, Future(), params=params)
        with self._lock:
            if rid in self._pending:
                raise ValueError(f"request id {rid!r} is already being prefilled")
            self._pending[rid] = pending

        def add(engine: LLMEngine):
            pending.seq = engine.add_request(rid, list(request.prompt_token_ids), local)

        try:
            self.loop.call(add)
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        try:
            return pending.future.result(timeout or self.transfer_timeout * 4)
        except TimeoutError:
            self.abort(rid)
            raise KVTransferError(f"prefill of {rid} timed out") from None

    def abort(self, request_id: str) -> bool:
        """Stop a prefill wherever it is; frees its blocks and aborts its transfer."""
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is None:
            return False

        def stop(engine: LLMEngine):
            if pending.handle is not None:
                pending.handle.abort()
            engine.abort(request_id)
            if pending.seq is not None:
                engine.scheduler.release(pending.seq)

        self.loop.call(stop)
        if not pending.future.done():
            pending.future.set_exception(KVTransferError(f"request {request_id} was aborted"))
        return True

    def stats(self) -> WorkerStats:
        eng = self.engine
        return WorkerStats(
            worker_id=self.worker_id,
            role="prefill",
            free_blocks=eng.blocks.num_free_blocks,
            total_blocks=eng.blocks.num_blocks,
            running=len(eng.scheduler.running),
            waiting=len(eng.scheduler.waiting),
            prompt_tokens=eng.stats["prompt_tokens"],
            generated_tokens=eng.stats["generated_tokens"],
            handoffs=self.handoffs["count"],
            handoff_seconds=self.handoffs["seconds"],
            handoff_bytes=self.handoffs["bytes"],
            handoff_tail_seconds=self.handoffs["tail_seconds"],
        )

    def close(self) -> None:
        self.loop.stop()
        self._finishers.shutdown(wait=False, cancel_futures=True)
        self.sender.close()

    # ---- loop-thread callbacks ---------------------------------------------------------------

    def _layer_hook(self, batch: list[ScheduledSeq]):
        """Open a transfer for every request whose prompt completes in this step."""
        handles: list[SendHandle] = []
        for item in batch:
            if not item.samples:
                continue
            with self._lock:
                pending = self._pending.get(item.seq.request_id)
            if pending is None or pending.handle is not None:
                continue
            n_blocks = len(pending.sink.block_ids)
            try:
                pending.handle = self.sender.open(pending.sink, item.seq.block_ids[:n_blocks])
                pending.opened_at, pending.num_blocks = time.perf_counter(), n_blocks
            except KVTransferError as e:
                # The prompt still finishes computing; _finish_transfer then frees it.
                if not pending.future.done():
                    pending.future.set_exception(e)
                continue
            handles.append(pending.handle)
        if not handles:
            return None

        def send(layer: int) -> None:
            for h in handles:
                h.send_layer(layer)

        return send

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                pending = self._pending.get(out.request_id)
            if pending is None or not out.finished:
                continue
            if out.new_token_ids:  # none when the step failed and aborted the request
                pending.result = PrefillResult(
                    request_id=out.request_id,
                    token_id=out.new_token_ids[0],
                    logprob=out.new_logprobs[0].logprob if out.new_logprobs else None,
                    top_logprobs=tuple(out.new_logprobs[0].top) if out.new_logprobs else (),
                    finish_reason=out.finish_reason or "",
                    cached_tokens=out.cached_tokens,
                    first_chunk=_client_first_chunk(out, pending.params),
                )
            pending.sampled_at = time.perf_counter()
            self._finishers.submit(self._finish_transfer, out.request_id, pending)

    def _finish_transfer(self, rid: str, pending: _Pending) -> None:
        error: Exception | None = None
        try:
            if pending.handle is None:
                raise KVTransferError(f"no KV transfer was opened for {rid}")
            if pending.result is None:
                pending.handle.abort()
                raise KVTransferError(f"prefill of {rid} was aborted before a token")
            if self._inject_failures > 0:
                self._inject_failures -= 1
                pending.handle.abort()
                raise KVTransferError(f"injected transfer failure for {rid}")
            pending.handle.finish(self.transfer_timeout)
            with self._lock:
                self.handoffs["count"] += 1
                now = time.perf_counter()
                self.handoffs["seconds"] += now - pending.opened_at
                self.handoffs["tail_seconds"] += now - pending.sampled_at
                self.handoffs["bytes"] += pending.num_blocks * self.engine.layout.block_bytes
        except Exception as e:  # noqa: BLE001 - reported to the caller below
            error = e
        # Free our copy on the loop thread (the block manager is single-threaded).
        seq = pending.seq
        self.loop.submit(lambda engine: engine.scheduler.release(seq) if seq else None)
        with self._lock:
            self._pending.pop(rid, None)
        if pending.future.done():
            return
        if error is None:
            pending.future.set_result(pending.result)
        else:
            pending.future.set_exception(
                error if isinstance(error, KVTransferError) else KVTransferError(str(error))
            )


def _client_first_chunk(out: RequestOutput, params: SamplingParams | None
                        ) -> OutputChunk | None:
    """The first token's output chunk exactly as the decode worker will stream it, when this
    side can know it: then the router sends it to the client as soon as the prefill returns,
    instead of after the decode worker's commit (TTFT), and drops it from the decode stream.

    Known here only when the token neither ends the request nor has its text held back: the
    request wants more than one token and has no stop strings (the decode worker owns those
    and may hold text back or cut it), and the one-token prefill finished by length, not by
    EOS or a stop token id. Its text is then the token's text as the decode worker's
    detokenizer will produce it: both start from the same empty window.
    """
    if (params is None or params.max_tokens <= 1 or params.stop
            or out.finish_reason != "length" or len(out.new_token_ids) != 1):
        return None
    return replace(OutputChunk.from_output(out), finished=False, finish_reason="",
                   prompt_tokens=0, completion_tokens=0, cached_tokens=0)
