"""The prefill worker: runs prompts (chunked, batched) and streams their KV to decode workers.

For each request it samples the first token with the request's seed, so disaggregated and
colocated runs agree, and sends every layer's KV blocks to the decode worker's reserved
blocks during the step that finishes the prompt — layer l leaves while layer l+1 computes.
Its own copy of the blocks is kept until the transfer is acknowledged, then freed (their
full blocks stay in the prefix cache for the next prompt with the same prefix). The push
is the engine's KV connector (kv_transfer/connector.py); this class only pairs each
request's first token with its push's outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_loop import EngineLoop, RecentIds
from pdserve.engine.executor.base import Executor
from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.engine.multi_connector import MultiConnector
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_store.connector import StoreConnector, store_stats
from pdserve.kv_transfer import KVTransferError
from pdserve.kv_transfer.connector import PushSender, TransferOutcome
from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest, WorkerStats

if TYPE_CHECKING:  # pdserve.tls imports grpc, which the local transport never needs
    from pdserve.tls import TLSFiles

log = logging.getLogger("pdserve.prefill")



@dataclass(slots=True)
class _Pending:
    future: Future
    params: SamplingParams | None  # the request's own (not the one-token copy); None: no
    # early first chunk (a resumed request)
    result: PrefillResult | None = None  # the first token, once sampled
    aborted: bool = False  # the request ended without a token (aborted, or its step failed)
    outcome: TransferOutcome | None = None  # the push's end, once known
    sampled_at: float = 0.0
    settled_at: float = 0.0  # when the push ended


class PrefillWorker:
    """Plain class behind the prefill Ray actor (testable without Ray)."""

    def __init__(
        self,
        config: EngineConfig,
        transport: str = "grpc",
        worker_id: str = "prefill-0",
        transfer_timeout: float = 30.0,
        inject_transfer_failures: int = 0,
        tls: TLSFiles | None = None,
        store: StoreConnector | None = None,
        executor: Executor | None = None,
    ):
        self.worker_id = worker_id
        self.transfer_timeout = transfer_timeout
        # The KV connector pushes each prompt's KV into its sink layer by layer and keeps the
        # request's blocks until the receiver acknowledged them (fault-injection tests: the
        # next N pushes fail after sending).
        # `tls`: the grpc sender's TLS to the receivers. A tensor-parallel worker
        # (`executor`: its rank group) pushes rank by rank: this driver sends its own KV
        # heads, each follower rank its own.
        tp = config.parallel.tensor_parallel_size
        opts = {"tls": tls} if tls is not None else {}
        if tp > 1:
            from pdserve.engine.loader.model_files import read_model_shape

            # The model's KV-head count says whether heads are split or replicated.
            opts["tp_size"] = tp
            opts["num_kv_heads"] = read_model_shape(config.model)["num_kv_heads"]
        self.connector = PushSender(transport, self._on_transfer_done, transfer_timeout,
                                    fail_next=inject_transfer_failures, **opts)
        # With the global KV store, prompts load their stored prefix and prefill only the
        # rest; the push then sends every block, loaded or computed.
        self.store = store
        engine_connector = self.connector if store is None \
            else MultiConnector([self.connector, store])
        self.engine = LLMEngine(config, kv_connector=engine_connector, executor=executor)
        self.sender = self.connector.sender  # nccl pairing goes through it (cluster/actors.py)
        self._pending: dict[str, _Pending] = {}
        # Aborts that came before any prefill call for their request, and prefill calls.
        self._aborted = RecentIds()
        self._started = RecentIds()
        self.handoffs = {"count": 0, "seconds": 0.0, "tail_seconds": 0.0, "bytes": 0}
        self._lock = threading.Lock()
        self.loop = EngineLoop(self.engine, self._on_outputs)
        if config.parallel.world_size > 1:
            # Each follower rank pushes its own part; a push ends when every part has.
            self.connector.bind_ranks(self.engine.rank_kv_control, self.loop.wake)
        if store is not None:
            store.on_saved = self.loop.wake  # saved blocks may be freed
        self.loop.start()

    # ---- API (called from the actor's threads) ---------------------------------------------

    @property
    def compat_key(self) -> str:
        return self.engine.compat_key

    def prefill(self, request: WorkerRequest, sink: KVSink,
                timeout: float | None = None) -> PrefillResult:
        """Prefill `request` and hand its KV to `sink`; returns the first sampled token.

        `request.params.seed` is set by the router, so both sides draw the same random
        numbers. The sink may start
        past the prompt's first blocks (the decode side holds them): only the rest is sent.
        Raises KVTransferError if the handoff fails (blocks on this side are freed by then
        or as soon as the request stops; the router aborts the reservation on the decode
        side).
        """
        rid, params = request.request_id, request.params
        failure = self.engine.executor.failure
        if failure:  # the router retries the handoff on another prefill worker
            raise KVTransferError(f"{self.worker_id} failed: {failure}")
        # Only the first token is made here: the decode worker does the rest and owns stop
        # strings; min_tokens matters only as far as suppressing eos for this first token.
        # A resumed request (migrated off a dead decode worker) is prefilled over its prompt
        # and the tokens already streamed, so its first token here is the next one: at the
        # same position, hence with the same random numbers, as on the worker that died.
        n_done = len(request.resumed_token_ids)
        local = replace(params, max_tokens=1, stop=(),
                        min_tokens=min(max(params.min_tokens - n_done, 0), 1))
        # The early first chunk's text would lack the streamed tokens as left context.
        pending = _Pending(Future(), params if not n_done else None)
        with self._lock:
            if self._aborted.pop(rid):
                raise KVTransferError(f"request {rid} was aborted before its prefill came")
            self._started.add(rid)
            if rid in self._pending:
                raise ValueError(f"request id {rid!r} is already being prefilled")
            self._pending[rid] = pending
        try:
            self.connector.send(rid, sink)

            def add(engine) -> None:
                # On the engine thread: an abort that came in between (it dropped `pending`
                # and queued its engine.abort before this) must not be undone by adding the
                # request after it; one that comes later finds the request in the engine.
                with self._lock:
                    if self._pending.get(rid) is not pending:
                        raise KVTransferError(f"request {rid} was aborted")
                engine.add_request(rid, list(request.all_token_ids), local)

            try:
                self.loop.call(add)
            except BaseException:
                self.connector.forget(rid)
                raise
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
        found = self.loop.call(lambda engine: engine.abort(request_id))
        self.connector.forget(request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(KVTransferError(f"request {request_id} was aborted"))
        with self._lock:
            if request_id not in self._started:
                # The router may abort a request whose prefill call is still on its way (a
                # client that cancels at once): remember it, so that call is refused
                # instead of computing a whole prompt nobody wants. (Not for one that came
                # already: a retry or a migration may prefill it here again.)
                self._aborted.add(request_id)
        return found or pending is not None

    def stats(self) -> WorkerStats:
        usage = self.engine.usage()
        failure = self.engine.executor.failure
        return WorkerStats(
            worker_id=self.worker_id,
            role="prefill",
            free_blocks=0 if failure else usage.free_blocks,  # a failed worker offers none
            total_blocks=usage.total_blocks,
            running=usage.running,
            waiting=usage.waiting,
            prompt_tokens=self.engine.stats["prompt_tokens"],
            generated_tokens=self.engine.stats["generated_tokens"],
            handoffs=self.handoffs["count"],
            handoff_seconds=self.handoffs["seconds"],
            handoff_bytes=self.handoffs["bytes"],
            handoff_tail_seconds=self.handoffs["tail_seconds"],
            **store_stats(self.store),
            tp=self.engine.layout_key.tp_size,
            pp=self.engine.layout_key.pp_size,
            preemptions=usage.preemptions,
            preempted_tokens=usage.preempted_tokens,
            solo_steps=usage.solo_steps,
            rank_failure=failure or "",
        )

    def close(self) -> None:
        self.loop.stop()
        self.connector.close()
        if self.store is not None:
            self.store.close()
        self.engine.shutdown()  # releases a rank group's followers

    # ---- callbacks: the engine thread (outputs) and the connector's threads (outcomes) -------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                pending = self._pending.get(out.request_id)
            if pending is None or not out.finished:
                continue
            result = None
            if out.new_token_ids and out.finish_reason != "abort":
                result = PrefillResult(
                    request_id=out.request_id,
                    token_id=out.new_token_ids[0],
                    logprob=out.new_logprobs[0].logprob if out.new_logprobs else None,
                    top_logprobs=tuple(out.new_logprobs[0].top) if out.new_logprobs else (),
                    finish_reason=out.finish_reason or "",
                    cached_tokens=out.cached_tokens,
                    first_chunk=_client_first_chunk(out, pending.params),
                )
            with self._lock:
                pending.result, pending.aborted = result, result is None
                pending.sampled_at = time.perf_counter()
            self._settle(out.request_id, pending)

    def _on_transfer_done(self, outcome: TransferOutcome) -> None:
        with self._lock:
            pending = self._pending.get(outcome.request_id)
            if pending is not None:
                pending.outcome, pending.settled_at = outcome, time.perf_counter()
        if pending is not None:
            self._settle(outcome.request_id, pending)
        self.loop.wake()  # the engine may free the request's blocks now

    def _settle(self, rid: str, pending: _Pending) -> None:
        """Answer the caller once the first token and the push's outcome are both known (a
        failed push answers at once; the request's blocks are freed when it stops)."""
        with self._lock:
            outcome, result = pending.outcome, pending.result
            aborted = pending.aborted
            if self._pending.get(rid) is not pending:
                return
            if not (aborted or (outcome is not None and (outcome.error or result))):
                return
            del self._pending[rid]
            if outcome is not None and outcome.error is None and not aborted:
                self.handoffs["count"] += 1
                self.handoffs["seconds"] += outcome.seconds
                self.handoffs["tail_seconds"] += max(0.0, pending.settled_at - pending.sampled_at)
                self.handoffs["bytes"] += outcome.num_blocks * self.engine.layout.block_bytes
        if pending.future.done():
            return
        if aborted:
            pending.future.set_exception(KVTransferError(f"prefill of {rid} was aborted"))
        elif outcome.error is not None:
            pending.future.set_exception(outcome.error)
        else:
            pending.future.set_result(result)


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
