"""The OpenAI-compatible HTTP front door (aiohttp), on the router's event loop beside gRPC.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (streaming as server-sent
events, or one JSON object), `GET /v1/models`, `GET /health`, `GET /metrics`. A request
becomes the same `pb.GenerateRequest` the gRPC API takes and goes through the same
`FrontDoor` (limits, validation, queue, lifecycle, metrics): there is one code path.

Status codes, each with OpenAI's error JSON: 400 a bad field (named in `param`), 401 a
missing or wrong bearer token (the gRPC API's rule: when a token is configured, every route
needs it), 404 an unknown model or route, 413 a body over `router.max_request_bytes`, 429
`router.max_queue` requests in flight, 503 no KV room within the admission timeout or a
failed handoff, 500 a worker error. A streamed request sends its headers with its first
event, so every refusal before the first token still gets its status; a failure after it
arrives as an `{"error": ...}` event before `[DONE]`. A client that disconnects cancels the
handler (aiohttp's `handler_cancellation`), which aborts the request on every worker. `n`
choices run as `n` requests admitted together; their chunks interleave as they come, and
one failing or the client leaving aborts them all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from contextlib import aclosing

from aiohttp import web

from pdserve.router.frontdoor import Admitted, FrontDoor, Refusal, Rejected, chunk_fields
from pdserve.router.metrics import CONTENT_TYPE, RouterMetrics
from pdserve.router.openai_protocol import (
    BadRequest,
    error_body,
    param_of,
    parse_chat,
    parse_completion,
)
from pdserve.router.openai_responses import Answer, joint_usage, usage_event, whole_response

log = logging.getLogger("pdserve.router")

_STATUS = {Refusal.INVALID: 400, Refusal.QUEUE_FULL: 429, Refusal.DECODE_FULL: 503,
           Refusal.UNAVAILABLE: 503, Refusal.INTERNAL: 500}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
STALE_STATS_SECONDS = 10.0


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status)


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class OpenAIServer:
    """Handlers of the HTTP API over one FrontDoor."""

    def __init__(self, door: FrontDoor, metrics: RouterMetrics | None = None):
        self.door = door
        self.metrics = metrics
        self.model = door.limits.model_name
        self.started = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.door.max_request_bytes,
                              middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    # ---- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """aiohttp's own refusals (unknown route, wrong method, body too large) in OpenAI's
        error shape."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason if e.status != 413 else e.text)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if not self.door.auth.allows(request.headers.get("Authorization")):
            return error_response(401, "missing or wrong bearer token", None, "invalid_api_key")
        return await handler(request)

    # ---- routes ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def models(self, request: web.Request) -> web.Response:
        info = self.door.model_info
        return web.json_response({"object": "list", "data": [{
            "id": info.name, "object": "model", "created": self.started, "owned_by": "pdserve",
            "max_model_len": info.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        lc = self.door.lifecycle
        h = lc.health()
        body = {"status": "ok", "mode": lc.mode, "prefill_workers": h.prefill_up,
                "decode_workers": h.decode_up, "workers_down": list(h.down)}
        if not h.serving:
            body["status"] = "a worker pool is empty: " + ", ".join(h.down) + " down"
            return web.json_response(body, status=503)
        age = self.metrics.stats_age() if self.metrics else None
        if age is not None and age > STALE_STATS_SECONDS:
            body["status"] = f"workers have not answered a stats poll for {age:.0f}s"
            return web.json_response(body, status=503)
        return web.json_response(body)

    async def metrics_page(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return error_response(404, "metrics are off")
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE})

    # ---- generation ------------------------------------------------------------------------

    async def _generate(self, request: web.Request, parse) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = parse(raw)
        except BadRequest as e:
            return error_response(400, str(e), e.param)
        if parsed.model and parsed.model != self.model:
            return error_response(404, f"The model `{parsed.model}` does not exist; this "
                                  f"server serves `{self.model}`.", "model", "model_not_found")
        try:
            admitted = self.door.admit_all(parsed.choice_requests(), parsed.fill_max_tokens)
        except Rejected as e:
            return _refused(e, param_of(e.message, parsed.kind))
        rid = admitted[0].request_id
        answers = [Answer(parsed, rid, self.model, a.prompt_ids, self.door.tokenizer, index=i)
                   for i, a in enumerate(admitted)]
        if parsed.stream:
            return await self._stream(request, admitted, answers)
        try:
            async with aclosing(self._chunks(admitted)) as chunks:
                async for i, chunk in chunks:
                    answers[i].absorb(chunk_fields(chunk))
        except Rejected as e:
            return _refused(e)
        return web.json_response(whole_response(answers))

    async def _stream(self, request: web.Request, admitted: list[Admitted],
                      answers: list[Answer]) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        try:
            async with aclosing(self._chunks(admitted)) as chunks:
                async for i, chunk in chunks:
                    events = answers[i].events(chunk_fields(chunk))
                    if not events:
                        continue
                    if resp is None:
                        resp = web.StreamResponse(headers=_SSE_HEADERS)
                        await resp.prepare(request)
                    await resp.write(b"".join(_sse(e) for e in events))
        except Rejected as e:
            if resp is None:
                return _refused(e)
            await resp.write(_sse(error_body(_STATUS[e.refusal], e.message)))
        except ConnectionError:
            # The client went away mid-write; closing the streams above aborted the request.
            log.info("client of %s disconnected", admitted[0].request_id)
            return resp
        if resp is None:  # the lifecycle ended without a chunk (not expected)
            resp = web.StreamResponse(headers=_SSE_HEADERS)
            await resp.prepare(request)
        if answers[0].parsed.include_usage and joint_usage(answers) is not None:
            await resp.write(_sse(usage_event(answers)))
        await resp.write(_sse("[DONE]"))
        await resp.write_eof()
        return resp

    async def _chunks(self, admitted: list[Admitted]):
        """(choice index, chunk) of every choice, as they come. Closing it, or one choice
        failing (raised as its Rejected), closes every choice's run: all are aborted."""
        if len(admitted) == 1:
            async with aclosing(self.door.run(admitted[0])) as chunks:
                async for chunk in chunks:
                    yield 0, chunk
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, a: Admitted) -> None:
            try:
                async with aclosing(self.door.run(a)) as chunks:
                    async for chunk in chunks:
                        queue.put_nowait((i, chunk))
            except Rejected as e:
                queue.put_nowait((i, e))
            else:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, a)) for i, a in enumerate(admitted)]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Rejected):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            # Every choice's abort must have reached its workers before the handler ends.
            await asyncio.gather(*tasks, return_exceptions=True)


def _refused(e: Rejected, param: str | None = None) -> web.Response:
    status = _STATUS[e.refusal]
    code = {Refusal.QUEUE_FULL: "queue_full", Refusal.DECODE_FULL: "kv_cache_full"}.get(
        e.refusal)
    return error_response(status, e.message, param if status == 400 else None, code)


async def start_http_server(server: OpenAIServer, host: str, port: int,
                            ssl_context: ssl.SSLContext | None = None
                            ) -> tuple[web.AppRunner, int]:
    """Serve `server` on host:port (0: a free port), HTTPS with `ssl_context`; returns the
    runner and the bound port."""
    # Streams still open at shutdown are cut after 5 s (their requests abort on the workers).
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"could not bind the HTTP API to {host}:{port}: {e}") from e
    bound = runner.addresses[0][1]
    return runner, bound
