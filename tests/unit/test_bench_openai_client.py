"""The benchmark's OpenAI client against a stand-in server that streams the way a server
without `return_token_ids` does (one event per piece of text, usage at the end): token
counts are reconciled with the usage, errors become records, bodies ask for forced lengths."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from pdserve.bench.openai_client import OpenAIClient, api_base, build_body
from pdserve.bench.workloads import RequestSpec

SPEC = RequestSpec(output_len=4, input_len=3, prompt_token_ids=(5, 6, 7))


def sse(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\r\n\r\n".encode()


async def serve(handler):
    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "served-model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def test_body_forces_the_output_length_and_asks_for_usage():
    path, body = build_body(SPEC, "m", seed=9)
    assert path == "/completions" and body["prompt"] == [5, 6, 7]
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"], body["seed"]) == (
        4, 4, True, 9)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    chat = RequestSpec(output_len=2, input_len=1, messages=(("user", "hi"),))
    path, body = build_body(chat, "m", force_output_len=False)
    assert path == "/chat/completions" and body["messages"] == [{"role": "user",
                                                                  "content": "hi"}]
    assert "min_tokens" not in body and "ignore_eos" not in body
    assert api_base("http://h:1/") == api_base("http://h:1/v1") == "http://h:1/v1"


def test_stream_without_token_ids_is_reconciled_with_usage():
    seen = {}

    async def handler(request):
        seen.update(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("a", "b", "cd"):  # "cd": two tokens in one event
            await resp.write(sse({"choices": [{"index": 0, "text": text,
                                               "finish_reason": None}], "usage": None}))
            await asyncio.sleep(0.01)
        await resp.write(sse({"choices": [{"index": 0, "text": "",
                                           "finish_reason": "length"}], "usage": None}))
        await resp.write(sse({"choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}))
        await resp.write(sse("[DONE]"))
        return resp

    async def main():
        runner, url = await serve(handler)
        client = OpenAIClient(url)
        try:
            health = await client.connect()
            record = await client.generate(SPEC, "r0", seed=1)
        finally:
            await client.close()
            await runner.cleanup()
        return health, record

    health, record = asyncio.run(main())
    assert health["model"] == "served-model" and seen["model"] == "served-model"
    assert record.error is None and record.ok
    assert record.chunk_tokens == [1, 1, 2] and record.streamed_tokens == 4
    assert (record.prompt_tokens, record.completion_tokens) == (3, 4)
    assert record.finish_reason == "length"
    assert record.chunk_times == sorted(record.chunk_times)


def test_http_and_stream_errors_are_recorded():
    calls = []

    async def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return web.json_response({"error": {"message": "server busy"}}, status=429)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse({"choices": [{"index": 0, "text": "a", "finish_reason": None}]}))
        await resp.write(sse({"error": {"message": "handoff failed"}}))
        await resp.write(sse("[DONE]"))
        return resp

    async def main():
        runner, url = await serve(handler)
        client = OpenAIClient(url, model="m")
        try:
            return [await client.generate(SPEC, f"r{i}") for i in range(2)]
        finally:
            await client.close()
            await runner.cleanup()

    busy, broken = asyncio.run(main())
    assert busy.error == "HTTP 429: server busy" and not busy.ok
    assert broken.error == "stream error: handoff failed" and not broken.ok
