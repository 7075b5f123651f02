"""One request's life in the router: route, reserve, prefill, commit, stream — or abort.

The handoff is a transaction (DESIGN.md): reserve blocks on decode worker D, prefill on P
(which streams KV into them), then commit on D and stream tokens. Any failure before the
first token reaches the client aborts both sides and retries on another worker pair; a
client that goes away aborts everywhere. Every path ends with both workers' blocks freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from router.policy import RoutingPolicy
from router.workers import DecodeClient, PrefillClient

log = logging.getLogger("pdserve.router")


class HandoffFailed(RuntimeError):
    """Every retry of a request's handoff failed."""


@dataclass
class RouterCounters:
    finished: int = 0
    aborted: int = 0
    handoff_retries: int = 0
    in_flight: int = 0
    errors: list[str] = field(default_factory=list)


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
    ):
        self.mode = mode
        self.prefill = prefill
        self.decode = decode
        self.policy = policy
        self.handoff_retries = handoff_retries
        self.lease_seconds = lease_seconds
        self.conditional_prefill_tokens = conditional_prefill_tokens
        self.counters = RouterCounters()

    async def run(self, request_id: str, ids: list[int], params: SamplingParams
                  ) -> AsyncIterator[dict]:
        """Yield output chunks (dicts) of one request; aborts it everywhere if closed early."""
        request = {"request_id": request_id, "prompt_token_ids": ids, "params": params.to_dict()}
        local = self.mode == "colocated" or len(ids) <= self.conditional_prefill_tokens
        self.counters.in_flight += 1
        try:
            if local:
                stream = self._run_local(request)
            else:
                stream = self._run_disaggregated(request, len(ids), params.max_tokens)
            async for chunk in stream:
                yield chunk
                if chunk.get("finished"):
                    if chunk.get("finish_reason") == "abort":
                        self.counters.aborted += 1
                    else:
                        self.counters.finished += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.aborted += 1
            raise
        finally:
            self.counters.in_flight -= 1

    async def _run_local(self, request: dict) -> AsyncIterator[dict]:
        d = self.policy.pick_decode(self.decode, len(request["prompt_token_ids"]))
        async for chunk in self._guarded(d.stream_local(request), [d], request["request_id"]):
            yield chunk

    async def _run_disaggregated(self, request: dict, n_prompt: int, max_tokens: int
                                 ) -> AsyncIterator[dict]:
        rid = request["request_id"]
        tried: set[str] = set()
        last_error: Exception | None = None
        for attempt in range(self.handoff_retries + 1):
            p = self.policy.pick_prefill(self.prefill, exclude=tried)
            d = self.policy.pick_decode(self.decode, n_prompt, exclude=tried)
            try:
                first = await self._handoff(request, n_prompt, max_tokens, p, d)
            except _HandoffError as e:
                last_error = e.__cause__ or e
                tried |= {p.worker_id, d.worker_id}
                if attempt < self.handoff_retries:
                    self.counters.handoff_retries += 1
                    log.warning("handoff of %s via %s -> %s failed (%s); retrying", rid,
                                p.worker_id, d.worker_id, last_error)
                continue
            async for chunk in self._guarded(d.stream_from_prefill(request, first), [p, d], rid):
                yield chunk
            return
        raise HandoffFailed(f"KV handoff failed after {self.handoff_retries + 1} attempts: "
                            f"{last_error}")

    async def _handoff(self, request, n_prompt, max_tokens, p: PrefillClient, d: DecodeClient):
        """reserve on D -> prefill on P (KV flows P->D); on any failure abort both sides."""
        rid = request["request_id"]
        reserved = False
        try:
            sink = await d.reserve(rid, n_prompt, max_tokens, self.lease_seconds)
            reserved = True
            self.policy.on_reserved(d, n_prompt)
            self.policy.in_flight[p.worker_id] = self.policy.in_flight.get(p.worker_id, 0) + 1
            try:
                return await p.prefill(request, sink)
            finally:
                self.policy.in_flight[p.worker_id] -= 1
        except asyncio.CancelledError:
            await _abort_all([p, d] if reserved else [p], rid)
            raise
        except Exception as e:
            await _abort_all([p, d] if reserved else [p], rid)
            raise _HandoffError(str(e)) from e

    @staticmethod
    async def _guarded(stream: AsyncIterator[dict], workers, rid: str) -> AsyncIterator[dict]:
        finished = False
        try:
            async for chunk in stream:
                finished = finished or bool(chunk.get("finished"))
                yield chunk
        finally:
            if not finished:
                # Shielded: the abort must reach the workers even while we are cancelled.
                await asyncio.shield(_abort_all(workers, rid))


class _HandoffError(RuntimeError):
    pass


async def _abort_all(workers, rid: str) -> None:
    results = await asyncio.gather(*(w.abort(rid) for w in workers), return_exceptions=True)
    for w, r in zip(workers, results):
        if isinstance(r, Exception):
            log.warning("abort of %s on %s failed: %s", rid, w.worker_id, r)
