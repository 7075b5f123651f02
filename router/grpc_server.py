"""The public gRPC front door: `pdserve.v1.Generation` and `pdserve.v1.Admin`.

Admission, validation and the run of a request are `router.frontdoor.FrontDoor`'s, shared
with the HTTP API; here they map to gRPC statuses. Validation errors (and request bytes
protobuf cannot parse, such as invalid UTF-8 in a string field) become INVALID_ARGUMENT, a
full queue RESOURCE_EXHAUSTED, a failed handoff after retries UNAVAILABLE; a client that
cancels its stream cancels the handler, which aborts the request on every worker. Optional
bearer-token auth is compared in constant time.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

import grpc

from pdserve.messages import OutputChunk
from pdserve.proto import pb, pb_grpc
from pdserve.router.frontdoor import BearerAuth, FrontDoor, Refusal, Rejected
from pdserve.router.lifecycle import RequestLifecycle
from pdserve.router.request_decoding import GenerateRequestParser, UndecodableRequest
from pdserve.router.workers import WorkerClient

log = logging.getLogger("pdserve.router")

_CODES = {Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
          Refusal.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
          Refusal.DECODE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
          Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
          Refusal.INTERNAL: grpc.StatusCode.INTERNAL}


class _Auth:
    def __init__(self, auth: BearerAuth):
        self.auth = auth

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        md = dict(context.invocation_metadata() or ())
        if not self.auth.allows(md.get("authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, door: FrontDoor, auth: _Auth):
        self.door = door
        self.lifecycle = door.lifecycle
        self.auth = auth
        self.model_info = door.model_info

    async def Generate(self, request: pb.GenerateRequest, context):  # noqa: N802 (gRPC name)
        await self.auth.check(context)
        if isinstance(request, UndecodableRequest):  # e.g. invalid UTF-8 in a string field
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            admitted = self.door.admit(request)
        except Rejected as e:
            await context.abort(_CODES[e.refusal], e.message)
        rid = admitted.request_id
        try:
            async with aclosing(self.door.run(admitted)) as chunks:
                async for chunk in chunks:
                    yield _response(rid, chunk)
        except Rejected as e:
            await context.abort(_CODES[e.refusal], e.message)
        except asyncio.CancelledError:
            log.info("client cancelled %s", rid)
            raise

    async def Health(self, request, context):  # noqa: N802
        await self.auth.check(context)
        lc = self.lifecycle
        return pb.HealthResponse(serving=True, prefill_workers=len(lc.prefill),
                                 decode_workers=len(lc.decode), mode=lc.mode)

    async def ListModels(self, request, context):  # noqa: N802
        await self.auth.check(context)
        return pb.ListModelsResponse(models=[self.model_info])


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, lifecycle: RequestLifecycle, auth: _Auth):
        self.lifecycle = lifecycle
        self.auth = auth

    async def Stats(self, request, context):  # noqa: N802
        await self.auth.check(context)
        lc = self.lifecycle
        workers: list[WorkerClient] = [*lc.prefill, *lc.decode]
        stats = await asyncio.gather(*(w.stats() for w in workers))
        lc.policy.update_stats(stats)
        c = lc.counters
        return pb.StatsResponse(
            workers=[
                pb.WorkerStats(
                    worker_id=s.worker_id, role=s.role, free_blocks=s.free_blocks,
                    total_blocks=s.total_blocks, running=s.running, waiting=s.waiting,
                    prompt_tokens_processed=s.prompt_tokens,
                    generated_tokens=s.generated_tokens, node=s.node,
                    handoffs=s.handoffs, handoff_seconds=s.handoff_seconds,
                    handoff_bytes=s.handoff_bytes, handoff_tail_seconds=s.handoff_tail_seconds,
                    leases_expired=s.leases_expired, tp=s.tp, pp=s.pp,
                    rank_failure=s.rank_failure,
                )
                for s in stats
            ],
            queued_requests=c.in_flight, requests_finished=c.finished,
            requests_aborted=c.aborted, handoff_retries=c.handoff_retries,
        )


def _response(rid: str, chunk: OutputChunk) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=rid, token_ids=chunk.token_ids, text=chunk.text)
    for lp in chunk.logprobs:
        resp.logprobs.append(pb.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        ))
    if chunk.finished:
        resp.finish_reason = chunk.finish_reason
        resp.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.prompt_tokens,
                                     completion_tokens=chunk.completion_tokens,
                                     cached_tokens=chunk.cached_tokens))
    return resp


async def start_server(door: FrontDoor, host: str, port: int
                       ) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port (useful with port 0)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length",
                                       door.max_request_bytes)],
                             interceptors=[GenerateRequestParser()])
    auth = _Auth(door.auth)
    pb_grpc.add_GenerationServicer_to_server(GenerationService(door, auth), server)
    pb_grpc.add_AdminServicer_to_server(AdminService(door.lifecycle, auth), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the router to {host}:{port}")
    await server.start()
    return server, bound
