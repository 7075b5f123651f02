"""What every front end (gRPC, OpenAI HTTP) does with a request, written once.

A front end turns its wire format into a `pb.GenerateRequest` and hands it here: `admit`
applies the request-size limit, validation and the queue limit; `run` drives
`RequestLifecycle.run` and reports every chunk to the metrics. Failures come out as
`Rejected` with a transport-neutral `Refusal`, which each front end maps to its own status
(gRPC code, HTTP status). A closed or cancelled `run` aborts the request on every worker
(the lifecycle does that), so a front end only has to stop iterating.

`chunk_fields` is the one place that reads a lifecycle output chunk for the front doors
added here (HTTP and metrics); the router <-> worker payload types may change under it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import TextTokenizer
from pdserve.messages import OutputChunk
from pdserve.proto import pb
from pdserve.router.lifecycle import DecodeFull, HandoffFailed, RequestLifecycle, WorkerLost
from pdserve.router.policy import NoWorkerUp
from pdserve.router.validation import InvalidRequest, Limits, validate

if TYPE_CHECKING:  # metrics imports this module
    from pdserve.router.metrics import RouterMetrics

log = logging.getLogger("pdserve.router")


class Refusal(enum.Enum):
    """Why a request was refused, independent of the wire protocol."""

    INVALID = "invalid"  # the client's input (gRPC INVALID_ARGUMENT, HTTP 400)
    QUEUE_FULL = "queue_full"  # max_queue in flight (RESOURCE_EXHAUSTED, 429)
    DECODE_FULL = "decode_full"  # no KV room within the admission timeout (RESOURCE_EXHAUSTED, 503)
    UNAVAILABLE = "unavailable"  # handoff retries failed, no worker up (UNAVAILABLE, 503)
    INTERNAL = "internal"  # a worker error (INTERNAL, 500)


class Rejected(Exception):
    """A request the router refused or could not complete; the message is for the client."""

    def __init__(self, refusal: Refusal, message: str):
        super().__init__(message)
        self.refusal = refusal
        self.message = message


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that passed every check and holds a place in the queue count."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class ChunkFields:
    """One output chunk as the front ends read it. `logprobs` holds one
    (token_id, logprob, ((top_id, top_logprob), ...)) per new token."""

    token_ids: list[int]
    text: str
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]]
    finished: bool
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def chunk_fields(chunk: OutputChunk) -> ChunkFields:
    """The fields of a lifecycle output chunk, as the front ends read them."""
    return ChunkFields(
        token_ids=list(chunk.token_ids),
        text=chunk.text,
        logprobs=[(lp.token_id, lp.logprob, lp.top) for lp in chunk.logprobs],
        finished=chunk.finished,
        finish_reason=chunk.finish_reason,
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        cached_tokens=chunk.cached_tokens,
    )


class BearerAuth:
    """The optional bearer token every front end checks, compared in constant time."""

    def __init__(self, token: str | None):
        self.token = token

    def allows(self, authorization: str | None) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest((authorization or "").encode(),
                                   f"Bearer {self.token}".encode())


class FrontDoor:
    """Admission and execution of requests, shared by the gRPC and HTTP servers.

    Invariant: every request that `admit` accepted is counted in `lifecycle.counters`
    only once `run` starts, and `run` always leaves the request finished or aborted on every
    worker when it returns, raises, or is closed early.
    """

    def __init__(self, lifecycle: RequestLifecycle, tokenizer: TextTokenizer, limits: Limits,
                 max_queue: int, max_request_bytes: int, auth: BearerAuth,
                 model_info: pb.ModelInfo, metrics: RouterMetrics | None = None):
        self.lifecycle = lifecycle
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_queue = max_queue
        self.max_request_bytes = max_request_bytes
        self.auth = auth
        self.model_info = model_info
        self.metrics = metrics

    def admit(self, request: pb.GenerateRequest, fill_max_tokens: bool = False) -> Admitted:
        """Check size, input and queue room; raises Rejected(INVALID or QUEUE_FULL).

        `fill_max_tokens`: the client left max_tokens unset and wants as many as fit (an
        OpenAI chat request): it becomes the room the context and the server's limit leave.
        """
        return self.admit_all([request], fill_max_tokens)[0]

    def admit_all(self, requests: list[pb.GenerateRequest], fill_max_tokens: bool = False
                  ) -> list[Admitted]:
        """`admit` for requests that run together (an OpenAI request's `n` choices): all
        pass, with room in the queue for every one, or none does."""
        if len(requests) > self.max_queue:
            raise Rejected(Refusal.INVALID, f"n={len(requests)} choices need as many places "
                                            f"in the queue; this server has {self.max_queue}")
        admitted = [self._checked(r, fill_max_tokens) for r in requests]
        if self.lifecycle.counters.in_flight + len(requests) > self.max_queue:
            if self.metrics:
                self.metrics.on_rejected(Refusal.QUEUE_FULL)
            raise Rejected(Refusal.QUEUE_FULL, f"server busy: {self.max_queue} requests in "
                                               "flight; retry later")
        return admitted

    def _checked(self, request: pb.GenerateRequest, fill_max_tokens: bool) -> Admitted:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise Rejected(Refusal.INVALID, f"request is {size} bytes; the limit is "
                                            f"{self.max_request_bytes}")
        try:
            ids, params = validate(request, self.tokenizer, self.limits)
        except InvalidRequest as e:
            raise Rejected(Refusal.INVALID, str(e)) from None
        if fill_max_tokens:
            room = min(self.limits.max_tokens_limit, self.limits.max_model_len - len(ids))
            params = dataclasses.replace(params, max_tokens=max(room, params.max_tokens))
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        return Admitted(rid, ids, params)

    async def run(self, admitted: Admitted) -> AsyncIterator:
        """Yield the request's output chunks; raises Rejected on a refusal or failure."""
        rid = admitted.request_id
        watch = self.metrics.watch(admitted) if self.metrics else None
        failed = False
        try:
            async with aclosing(self.lifecycle.run(rid, admitted.prompt_ids,
                                                   admitted.params)) as stream:
                async for chunk in stream:
                    if watch:
                        watch.on_chunk(chunk_fields(chunk))
                    yield chunk
        except DecodeFull as e:
            if self.metrics:
                self.metrics.on_rejected(Refusal.DECODE_FULL)
            watch = None  # refused before it ran: a rejection, not a finished request
            raise Rejected(Refusal.DECODE_FULL, str(e)) from e
        except (HandoffFailed, NoWorkerUp, WorkerLost) as e:
            failed = True
            raise Rejected(Refusal.UNAVAILABLE, str(e)) from e
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # a worker error: the client gets a status, the router lives
            failed = True
            log.exception("request %s failed", rid)
            raise Rejected(Refusal.INTERNAL, f"request failed: {e}") from e
        finally:
            if watch:
                watch.close(failed)
