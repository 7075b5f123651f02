"""One request's life in the router: route, reserve, prefill, commit, stream — or abort.

The handoff is a transaction (DESIGN.md): reserve blocks on decode worker D, prefill on P
(which streams KV into them), then commit on D and stream tokens. When P can vouch for the
first token's output chunk, the router streams it as soon as P returns, before the commit.
A failure of the reserve or the prefill aborts both sides and retries on another worker
pair; a client that goes away aborts everywhere. Every path ends with both workers' blocks
freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from pdserve.engine.sampling_params import SamplingParams
from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest
from pdserve.router.policy import RoutingPolicy
from pdserve.router.workers import DecodeClient, PrefillClient, WorkerBusy

log = logging.getLogger("pdserve.router")


class HandoffFailed(RuntimeError):
    """Every retry of a request's handoff failed."""


class DecodeFull(RuntimeError):
    """No decode worker had room for the prompt's KV within the admission timeout."""


@dataclass
class RouterCounters:
    finished: int = 0
    aborted: int = 0
    handoff_retries: int = 0
    in_flight: int = 0


class RequestLifecycle:
    """Routes requests over the worker pools and runs the handoff transaction."""

    def __init__(
        self,
        mode: str,
        prefill: list[PrefillClient],
        decode: list[DecodeClient],
        policy: RoutingPolicy,
        handoff_retries: int = 2,
        lease_seconds: float = 30.0,
        conditional_prefill_tokens: int = 0,
        admission_timeout: float = 120.0,
    ):
        self.mode = mode
        self.prefill = prefill
        self.decode = decode
        self.policy = policy
        self.handoff_retries = handoff_retries
        self.lease_seconds = lease_seconds
        self.conditional_prefill_tokens = conditional_prefill_tokens
        self.admission_timeout = admission_timeout
        self.counters = RouterCounters()

    async def run(self, request_id: str, ids: list[int], params: SamplingParams
                  ) -> AsyncIterator[OutputChunk]:
        """Yield output chunks of one request; aborts it everywhere if closed early."""
        request = WorkerRequest(request_id, tuple(ids), params)
        local = self.mode == "colocated" or len(ids) <= self.conditional_prefill_tokens
        self.counters.in_flight += 1
        try:
            if local:
                stream = self._run_local(request)
            else:
                stream = self._run_disaggregated(request, len(ids), params.max_tokens)
            async for chunk in stream:
                yield chunk
                if chunk.finished:
                    if chunk.finish_reason == "abort":
                        self.counters.aborted += 1
                    else:
                        self.counters.finished += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.aborted += 1
            raise
        finally:
            self.counters.in_flight -= 1

    async def _run_local(self, request: WorkerRequest) -> AsyncIterator[OutputChunk]:
        d = self.policy.pick_decode(self.decode, len(request.prompt_token_ids))
        async for chunk in self._guarded(d.stream_local(request), [d], request.request_id):
            yield chunk

    async def _run_disaggregated(self, request: WorkerRequest, n_prompt: int, max_tokens: int
                                 ) -> AsyncIterator[OutputChunk]:
        rid = request.request_id
        tried: set[str] = set()
        last_error: Exception | None = None
        for attempt in range(self.handoff_retries + 1):
            p = self.policy.pick_prefill(self.prefill, exclude=tried)
            self.policy.on_prefill_started(p)
            try:
                d, sink = await self._reserve_when_room(rid, n_prompt, max_tokens, tried,
                                                        list(request.prompt_token_ids))
                first = await self._prefill(request, p, d, sink)
            except _HandoffError as e:
                last_error = e.__cause__ or e
                tried |= {p.worker_id, d.worker_id}
                if attempt < self.handoff_retries:
                    self.counters.handoff_retries += 1
                    log.warning("handoff of %s via %s -> %s failed (%s); retrying", rid,
                                p.worker_id, d.worker_id, last_error)
                continue
            finally:
                self.policy.on_prefill_done(p)
            stream = d.stream_from_prefill(request, first)
            if first.first_chunk is not None:
                stream = _first_chunk_early(first.first_chunk, stream, rid)
            async for chunk in self._guarded(stream, [p, d], rid):
                yield chunk
            return
        raise HandoffFailed(f"KV handoff failed after {self.handoff_retries + 1} attempts: "
                            f"{last_error}")

    async def _reserve_when_room(self, rid: str, n_prompt: int, max_tokens: int,
                                 tried: set[str], prompt: list[int]
                                 ) -> tuple[DecodeClient, KVSink]:
        """Reserve the prompt's blocks on a decode worker, waiting while every one is full.

        A full decode pool is back-pressure, not a failure: its running requests free blocks
        as they finish, so the request queues here (bounded by `admission_timeout`) instead
        of burning handoff retries. Any other reserve error is a handoff failure.
        """
        deadline = asyncio.get_running_loop().time() + self.admission_timeout
        delay = 0.02
        while True:
            busy: set[str] = set()
            while len(busy) < len(self.decode):
                d = self.policy.pick_decode(self.decode, n_prompt, exclude=tried | busy)
                if d.worker_id in busy:
                    break
                try:
                    # D reuses what it has cached of the prompt; P sends only the rest.
                    sink = await d.reserve(rid, n_prompt, max_tokens, self.lease_seconds,
                                           prompt)
                except WorkerBusy:
                    busy.add(d.worker_id)
                    continue
                except Exception as e:
                    raise HandoffFailed(f"reserving KV blocks on {d.worker_id} failed: {e}") \
                        from e
                self.policy.on_reserved(d, n_prompt)
                return d, sink
            if asyncio.get_running_loop().time() + delay > deadline:
                raise DecodeFull(f"no decode worker had {n_prompt} tokens of free KV blocks "
                                 f"within {self.admission_timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _prefill(self, request: WorkerRequest, p: PrefillClient, d: DecodeClient,
                       sink: KVSink) -> PrefillResult:
        """Prefill on P into D's reservation; on any failure abort both sides."""
        rid = request.request_id
        try:
            return await p.prefill(request, sink)
        except asyncio.CancelledError:
            await asyncio.shield(_abort_all([p, d], rid))
            raise
        except Exception as e:
            await _abort_all([p, d], rid)
            raise _HandoffError(str(e)) from e

    @staticmethod
    async def _guarded(stream: AsyncIterator[OutputChunk], workers, rid: str
                       ) -> AsyncIterator[OutputChunk]:
        finished = False
        try:
            async for chunk in stream:
                finished = finished or chunk.finished
                yield chunk
        finally:
            if not finished:
                # Shielded: the abort must reach the workers even while we are cancelled.
                await asyncio.shield(_abort_all(workers, rid))


class _HandoffError(RuntimeError):
    pass


async def _first_chunk_early(early: OutputChunk, stream: AsyncIterator[OutputChunk], rid: str
                             ) -> AsyncIterator[OutputChunk]:
    """Yield the prefill worker's first-token chunk at once, then the decode stream without
    that token. The prefill side sends the chunk only when the decode side's first output is
    sure to be the same token with the same text (`prefill_worker.worker._client_first_chunk`),
    so the client's first token no longer waits for the commit on the decode worker."""
    yield early
    n_tok, n_text, n_lp = len(early.token_ids), len(early.text), len(early.logprobs)
    first = True
    async for chunk in stream:
        if first:
            first = False
            if (chunk.token_ids[:n_tok] != early.token_ids
                    or not chunk.text.startswith(early.text)):
                raise RuntimeError(f"decode stream of {rid} does not start with the first "
                                   f"token the prefill worker sampled")
            chunk = replace(chunk, token_ids=chunk.token_ids[n_tok:],
                            text=chunk.text[n_text:], logprobs=chunk.logprobs[n_lp:])
            if chunk.empty:
                continue
        yield chunk


async def _abort_all(workers, rid: str) -> None:
    results = await asyncio.gather(*(w.abort(rid) for w in workers), return_exceptions=True)
    for w, r in zip(workers, results):
        if isinstance(r, Exception):
            log.warning("abort of %s on %s failed: %s", rid, w.worker_id, r)
