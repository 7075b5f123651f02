"""The public gRPC front door: `pdserve.v1.Generation` and `pdserve.v1.Admin`.

Admission, validation and the run of a request are `router.frontdoor.FrontDoor`'s, shared
with the HTTP API; here they map to gRPC statuses. Validation errors (and request bytes
protobuf cannot parse, such as invalid UTF-8 in a string field) become INVALID_ARGUMENT, a
full queue RESOURCE_EXHAUSTED, a failed handoff after retries UNAVAILABLE; a client that
cancels its stream cancels the handler, which aborts the request on every worker. Optional
bearer-token auth is compared in constant time. With TLS configured the port speaks only
TLS: a plaintext client fails its handshake.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

import grpc

from pdserve.messages import OutputChunk, StorePoolStats
from pdserve.proto import pb, pb_grpc
from pdserve.router.frontdoor import BearerAuth, FrontDoor, Refusal, Rejected
from pdserve.router.lifecycle import RequestLifecycle, WorkerReport
from pdserve.router.request_decoding import GenerateRequestParser, UndecodableRequest
from pdserve.tls import TLSFiles, add_port

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
        h = self.lifecycle.health()
        return pb.HealthResponse(serving=h.serving, prefill_workers=h.prefill_up,
                                 decode_workers=h.decode_up, mode=self.lifecycle.mode,
                                 workers_down=list(h.down))

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
        reports, pools = await asyncio.gather(lc.worker_reports(), lc.store_pool_stats())
        c = lc.counters
        return pb.StatsResponse(
            workers=[_worker_stats(r) for r in reports],
            queued_requests=c.in_flight, requests_finished=c.finished,
            requests_aborted=c.aborted, handoff_retries=c.handoff_retries,
            migrations=c.migrations, workers_replaced=c.workers_replaced,
            kv_store=[_store_pool(p, reports) for p in pools],
            routing_policy=lc.policy.name,
        )


def _store_pool(p: StorePoolStats, reports: list[WorkerReport]) -> pb.KVStorePool:
    """A node's pool with the store counters of the workers on that node summed."""
    mine = [r.stats for r in reports if r.stats is not None and r.stats.node == p.node]
    hit_tokens = sum(s.store_hit_tokens for s in mine)
    computed = sum(s.prompt_tokens for s in mine)
    state = "up" if p.indexed else ("unindexed" if p.path else "down")
    return pb.KVStorePool(
        node=p.node, tier=p.tier, state=state, block_bytes=p.block_bytes,
        capacity_blocks=p.capacity_blocks, used_blocks=p.used_blocks,
        pinned_blocks=p.pinned_blocks, evictions=p.evictions, puts=p.puts,
        lookups=sum(s.store_lookups for s in mine),
        hit_blocks=sum(s.store_hit_blocks for s in mine), hit_tokens=hit_tokens,
        token_hit_rate=hit_tokens / (hit_tokens + computed) if hit_tokens + computed else 0.0,
    )


def _worker_stats(r: WorkerReport) -> pb.WorkerStats:
    s = r.stats
    if s is None:
        return pb.WorkerStats(worker_id=r.worker_id, role=r.role, state="down")
    return pb.WorkerStats(
        worker_id=s.worker_id, role=s.role, free_blocks=s.free_blocks,
        total_blocks=s.total_blocks, running=s.running, waiting=s.waiting,
        prompt_tokens_processed=s.prompt_tokens, generated_tokens=s.generated_tokens,
        node=s.node, handoffs=s.handoffs, handoff_seconds=s.handoff_seconds,
        handoff_bytes=s.handoff_bytes, handoff_tail_seconds=s.handoff_tail_seconds,
        leases_expired=s.leases_expired, state="up", tp=s.tp, pp=s.pp,
        rank_failure=s.rank_failure, store_lookups=s.store_lookups,
        store_hit_blocks=s.store_hit_blocks, store_hit_tokens=s.store_hit_tokens,
        store_saved_blocks=s.store_saved_blocks, store_loaded_bytes=s.store_loaded_bytes,
        store_load_seconds=s.store_load_seconds,
        preemptions=s.preemptions, preempted_tokens=s.preempted_tokens,
        store_pulled_blocks=s.store_pulled_blocks, store_pulled_bytes=s.store_pulled_bytes,
        store_pull_seconds=s.store_pull_seconds, store_save_skipped=s.store_save_skipped,
        solo_steps=s.solo_steps,
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


async def start_server(door: FrontDoor, host: str, port: int, tls: TLSFiles | None = None
                       ) -> tuple[grpc.aio.Server, int]:
    """Start serving (TLS with `tls`); returns the server and the bound port (useful with
    port 0)."""
    # grpc refuses a larger message (RESOURCE_EXHAUSTED) before it is parsed: the same
    # bound the HTTP body has. Headers (the bearer token) stay within grpc's 8 KiB default.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length",
                                       door.max_request_bytes),
                                      ("grpc.max_metadata_size", 8 << 10)],
                             interceptors=[GenerateRequestParser()])
    auth = _Auth(door.auth)
    pb_grpc.add_GenerationServicer_to_server(GenerationService(door, auth), server)
    pb_grpc.add_AdminServicer_to_server(AdminService(door.lifecycle, auth), server)
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"could not bind the router to {host}:{port}")
    await server.start()
    return server, bound
