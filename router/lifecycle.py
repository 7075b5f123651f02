"""One request's life in the router: route, reserve, prefill, commit, stream — or abort.

The handoff is a transaction (DESIGN.md): reserve blocks on decode worker D, prefill on P
(which streams KV into them), then commit on D and stream tokens. When P can vouch for the
first token's output chunk, the router streams it as soon as P returns, before the commit.
A failure of the reserve or the prefill aborts both sides and retries on another worker
pair; a client that goes away aborts everywhere. Every path ends with both workers' blocks
freed.

Worker death is routine: a worker found dead (`WorkerDown`) is marked down in the policy
(never picked again until the supervisor replaced it). A request whose decode worker dies
mid-stream is *migrated*: re-run on another decode worker from its prompt plus the tokens
the client already has, with the same seed, so the continuation samples the same tokens at
the same positions and the client sees no gap and no repeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from pdserve.engine.sampling_params import SamplingParams
from pdserve.messages import (
    KVSink,
    OutputChunk,
    PrefillResult,
    StorePoolStats,
    WorkerRequest,
    WorkerStats,
)
from pdserve.router.policy import RoutingPolicy
from pdserve.router.workers import DecodeClient, PrefillClient, WorkerBusy, WorkerDown

log = logging.getLogger("pdserve.router")


class HandoffFailed(RuntimeError):
    """Every retry of a request's handoff failed."""


class DecodeFull(RuntimeError):
    """No decode worker had room for the prompt's KV within the admission timeout."""


@dataclass(frozen=True, slots=True)
class PoolHealth:
    """What Health answers: serving while every pool has a worker up."""

    serving: bool
    prefill_up: int
    decode_up: int
    down: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """One worker in Admin.Stats: its stats, or None when it is down or did not answer."""

    worker_id: str
    role: str
    stats: WorkerStats | None


class WorkerLost(RuntimeError):
    """A request's decode worker died and the request could not be migrated."""


@dataclass
class RouterCounters:
    finished: int = 0
    aborted: int = 0
    handoff_retries: int = 0
    in_flight: int = 0
    migrations: int = 0  # requests moved off a dead decode worker mid-stream
    workers_replaced: int = 0  # dead or hung workers the supervisor replaced


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
        max_migrations: int = 2,
    ):
        self.mode = mode
        self.prefill = prefill
        self.decode = decode
        self.policy = policy
        self.handoff_retries = handoff_retries
        self.lease_seconds = lease_seconds
        self.conditional_prefill_tokens = conditional_prefill_tokens
        self.admission_timeout = admission_timeout
        self.max_migrations = max_migrations
        self.counters = RouterCounters()
        # Called with a worker's id when a call finds it dead (the supervisor replaces it).
        self.on_worker_down: Callable[[str], None] | None = None
        # The global KV store's node pools, for Admin.Stats (set where the store runs).
        self.store_pools: Callable[[], Awaitable[list[StorePoolStats]]] | None = None

    async def store_pool_stats(self) -> list[StorePoolStats]:
        """Every node pool of the global KV store ([] when it is off)."""
        return [] if self.store_pools is None else await self.store_pools()

    def worker_down(self, worker_id: str) -> None:
        """A call found `worker_id` dead: route around it from now on."""
        if worker_id in self.policy.down:
            return
        log.warning("worker %s is down; routing around it until it is replaced", worker_id)
        self.policy.mark_down(worker_id)
        if self.on_worker_down is not None:
            self.on_worker_down(worker_id)

    def health(self) -> PoolHealth:
        p_up, d_up = len(self.policy.up(self.prefill)), len(self.policy.up(self.decode))
        serving = d_up > 0 and (p_up > 0 or self.mode == "colocated")
        down = tuple(w.worker_id for w in [*self.prefill, *self.decode]
                     if w.worker_id in self.policy.down)
        return PoolHealth(serving, p_up, d_up, down)

    async def worker_reports(self, timeout: float = 2.0) -> list[WorkerReport]:
        """Every configured worker, in pool order: the stats of those that answered within
        `timeout`, None for the others (down, or not answering now). Never raises for a
        worker: one dead or hung worker must not hide the others."""
        decode_role = "decode" if self.mode == "disaggregated" else "colocated"
        workers = [(w, "prefill") for w in self.prefill] + [(w, decode_role)
                                                             for w in self.decode]

        async def ask(w) -> WorkerStats | None:
            if w.worker_id in self.policy.down:
                return None  # it may hang: the supervisor's probe already said so
            try:
                return await asyncio.wait_for(w.stats(), timeout)
            except WorkerDown:
                self.worker_down(w.worker_id)
                return None
            except Exception as e:  # noqa: BLE001 - shown as not answering, others still shown
                log.warning("stats of %s failed: %s", w.worker_id, e)
                return None

        answers = await asyncio.gather(*(ask(w) for w, _ in workers))
        self.policy.update_stats([a for a in answers if a is not None])
        return [WorkerReport(w.worker_id, role, a) for (w, role), a in zip(workers, answers)]

    async def run(self, request_id: str, ids: list[int], params: SamplingParams
                  ) -> AsyncIterator[OutputChunk]:
        """Yield output chunks of one request; aborts it everywhere if closed early."""
        request = WorkerRequest(request_id, tuple(ids), params)
        where = await self.policy.locate(ids)  # where the prefix is cached (or None)
        local = self.mode == "colocated" or self.policy.prefill_on_decode(
            self.decode, len(ids), where, self.conditional_prefill_tokens)
        self.counters.in_flight += 1
        streamed: list[int] = []  # what the client has: a migration resumes after it
        chars = 0
        try:
            for migration in range(self.max_migrations + 1):
                if migration:
                    request = replace(request, resumed_token_ids=tuple(streamed),
                                      resumed_chars=chars)
                attempt = (self._run_local(request, where) if local
                           else self._run_disaggregated(request, where))
                try:
                    # Closed at once when the client goes away: that aborts on the workers.
                    async with aclosing(attempt) as stream:
                        async for chunk in stream:
                            streamed.extend(chunk.token_ids)
                            chars += len(chunk.text)
                            yield chunk
                            if chunk.finished:
                                if chunk.finish_reason == "abort":
                                    self.counters.aborted += 1
                                else:
                                    self.counters.finished += 1
                    return
                except WorkerDown as e:
                    # Only a decode stream raises it here: the handoff handles its own.
                    self.worker_down(e.worker_id)
                    if migration == self.max_migrations:
                        raise WorkerLost(f"{e}; {request_id} was moved {migration} times, "
                                         "giving up") from None
                    self.counters.migrations += 1
                    log.warning("%s: migrating %s after %d tokens", e, request_id,
                                len(streamed))
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.aborted += 1
            raise
        finally:
            self.counters.in_flight -= 1

    async def _run_local(self, request: WorkerRequest, where=None
                         ) -> AsyncIterator[OutputChunk]:
        d = self.policy.pick_local(self.decode, len(request.all_token_ids), where)
        # Its prefill counts as in flight on `d` until the first chunk (or the end), the
        # request as running there until the end.
        self.policy.on_prefill_started(d)
        self.policy.on_local_started(d)
        prefilling = True
        try:
            async for chunk in self._guarded(d.stream_local(request), [d], request.request_id):
                if prefilling:
                    prefilling = False
                    self.policy.on_prefill_done(d)
                yield chunk
        finally:
            self.policy.on_local_done(d)
            if prefilling:
                self.policy.on_prefill_done(d)

    async def _run_disaggregated(self, request: WorkerRequest, where=None
                                 ) -> AsyncIterator[OutputChunk]:
        rid = request.request_id
        # A resumed request hands off its prompt and the tokens already streamed, and needs
        # room for the rest of its output only.
        tokens = list(request.all_token_ids)
        max_tokens = request.params.max_tokens - len(request.resumed_token_ids)
        tried: set[str] = set()
        last_error: Exception | None = None
        for attempt in range(self.handoff_retries + 1):
            p = self.policy.pick_prefill(self.prefill, exclude=tried, where=where)
            self.policy.on_prefill_started(p)
            try:
                d, sink = await self._reserve_when_room(rid, len(tokens), max_tokens, tried,
                                                        tokens, where)
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
                                 tried: set[str], prompt: list[int], where=None
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
            while len(busy) < len(self.policy.up(self.decode)):
                d = self.policy.pick_decode(self.decode, n_prompt, exclude=tried | busy,
                                            where=where)
                if d.worker_id in busy:
                    break
                try:
                    # D reuses what it has cached of the prompt; P sends only the rest.
                    sink = await self._reserve(d, rid, n_prompt, max_tokens, prompt)
                except WorkerBusy:
                    busy.add(d.worker_id)
                    continue
                except WorkerDown as e:
                    self.worker_down(e.worker_id)  # and pick among the others
                    continue
                except Exception as e:
                    raise HandoffFailed(f"reserving KV blocks on {d.worker_id} failed: {e}") \
                        from e
                self.policy.on_reserved(d, n_prompt, where)
                return d, sink
            if asyncio.get_running_loop().time() + delay > deadline:
                raise DecodeFull(f"no decode worker had {n_prompt} tokens of free KV blocks "
                                 f"within {self.admission_timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _reserve(self, d: DecodeClient, rid: str, n_prompt: int, max_tokens: int,
                       prompt: list[int]) -> KVSink:
        """`d.reserve`, made safe to cancel: a reservation is made even when the caller
        goes away while the call is on its way, so on cancel this waits for the answer and
        aborts what it reserved (an abort sent at once could reach D first and find
        nothing), instead of leaving the blocks to the lease."""
        call = asyncio.ensure_future(d.reserve(rid, n_prompt, max_tokens, self.lease_seconds,
                                               prompt))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.shield(self._abort_reserved(call, d, rid))
            raise

    async def _abort_reserved(self, call: asyncio.Future, d: DecodeClient, rid: str) -> None:
        try:
            await call
        except Exception:  # noqa: BLE001 - nothing was reserved
            return
        await self._abort_all([d], rid)

    async def _prefill(self, request: WorkerRequest, p: PrefillClient, d: DecodeClient,
                       sink: KVSink) -> PrefillResult:
        """Prefill on P into D's reservation, keeping the lease alive while P works; on any
        failure abort both sides."""
        rid = request.request_id
        lease = asyncio.create_task(self._keep_lease(d, rid))
        try:
            return await p.prefill(request, sink)
        except asyncio.CancelledError:
            await asyncio.shield(self._abort_all([p, d], rid))
            raise
        except Exception as e:
            if isinstance(e, WorkerDown):
                self.worker_down(e.worker_id)
            await self._abort_all([p, d], rid)
            raise _HandoffError(str(e)) from e
        finally:
            lease.cancel()

    async def _keep_lease(self, d: DecodeClient, rid: str) -> None:
        """Renew the reservation's lease on D while the prefill call on P is pending.

        The lease exists to free blocks whose prefill will never come (the router or P
        died); a prefill that is queued or long is not that, and must not be thrown away
        and redone because it outlived the lease. The router is the party that knows the
        prefill is still wanted and in progress, so it renews: every third of a lease,
        until the call returns or fails. If the router dies, renewals stop and the lease
        frees the blocks as before."""
        period = self.lease_seconds / 3
        while True:
            await asyncio.sleep(period)
            try:
                if not await d.renew(rid, self.lease_seconds):
                    return  # gone (aborted or expired): the push will be refused
            except Exception as e:  # noqa: BLE001 - D is down; the prefill call fails too
                log.warning("renewing the lease of %s on %s failed: %s", rid, d.worker_id, e)
                return

    async def _guarded(self, stream: AsyncIterator[OutputChunk], workers, rid: str
                       ) -> AsyncIterator[OutputChunk]:
        finished = False
        try:
            async for chunk in stream:
                finished = finished or chunk.finished
                yield chunk
        finally:
            if not finished:
                # Shielded: the abort must reach the workers even while we are cancelled.
                await asyncio.shield(self._abort_all(workers, rid))

    async def _abort_all(self, workers, rid: str) -> None:
        live = [w for w in workers if w.worker_id not in self.policy.down]
        results = await asyncio.gather(*(w.abort(rid) for w in live), return_exceptions=True)
        for w, r in zip(live, results):
            if isinstance(r, WorkerDown):
                self.worker_down(w.worker_id)
            elif isinstance(r, Exception):
                log.warning("abort of %s on %s failed: %s", rid, w.worker_id, r)


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

