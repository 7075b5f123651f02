"""An async client for any OpenAI-compatible HTTP server (pdserve's, vLLM's, SGLang's) that
records what it sees, the way ``client.GenerationClient`` does over gRPC.

Token-id prompts go to ``/v1/completions`` as ``prompt: [ids]``, text prompts to
``/v1/completions``, chat messages to ``/v1/chat/completions``; every request streams with
``stream_options.include_usage``, so token totals come from the server's usage. Forcing the
output length sends ``min_tokens`` and ``ignore_eos`` (vLLM's and SGLang's extensions, which
pdserve shares). Tokens per streamed event: the length of the event's ``token_ids`` when the
server returns them (``return_token_ids``, which pdserve and vLLM >= 0.10.2 honour); else one
per event that carries text, with the difference to the usage's completion tokens added to
the last event (a server that packs several tokens into one event then shows their gaps as
one). Timestamps are ``time.perf_counter()`` as each event is parsed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from pdserve.bench.client import ServerUnreachable
from pdserve.bench.records import RequestRecord
from pdserve.bench.workloads import RequestSpec
from pdserve.tls import TLSFiles


def api_base(base_url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` -> ``http://host:8000/v1``."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def build_body(spec: RequestSpec, model: str, *, force_output_len: bool = True,
               temperature: float = 0.0, seed: int | None = None) -> tuple[str, dict[str, Any]]:
    """(path under /v1, JSON body) for ``spec``."""
    body: dict[str, Any] = {
        "model": model, "max_tokens": spec.output_len, "temperature": temperature,
        "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
    }
    if force_output_len:
        body.update(min_tokens=spec.output_len, ignore_eos=True)
    if seed is not None:
        body["seed"] = seed
    if spec.prompt_token_ids is not None:
        return "/completions", {**body, "prompt": list(spec.prompt_token_ids)}
    if spec.messages is not None:
        messages = [{"role": role, "content": content} for role, content in spec.messages]
        return "/chat/completions", {**body, "messages": messages}
    if spec.prompt is not None:
        return "/completions", {**body, "prompt": spec.prompt}
    raise ValueError("request has no input")


class OpenAIClient:
    """Sends workload requests to one OpenAI-compatible server; one RequestRecord each."""

    def __init__(self, base_url: str, *, model: str | None = None,
                 request_timeout: float = 300.0, force_output_len: bool = True,
                 temperature: float = 0.0, api_key: str | None = None,
                 ca_file: str | None = None) -> None:
        self.base = api_base(base_url)
        self.model = model
        self.request_timeout = request_timeout
        self.force_output_len = force_output_len
        self.temperature = temperature
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No connection cap: the arrival process, not the client, decides concurrency.
        # `ca_file`: an https:// server whose certificate that CA signed (pdserve `tls:`).
        ssl_ctx = TLSFiles(ca_file=ca_file).client_ssl_context() if ca_file else True
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl_ctx))

    async def close(self) -> None:
        await self._session.close()

    async def connect(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask ``GET /v1/models``; picks the first model when none was named. Raises
        ServerUnreachable when the server cannot be reached or refuses."""
        try:
            async with self._session.get(self.base + "/models", headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    raise ServerUnreachable(f"{self.base}/models answered HTTP {resp.status}: "
                                            f"{_error_text(await resp.text())}")
                models = [m["id"] for m in (await resp.json()).get("data") or []]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
            raise ServerUnreachable(f"cannot reach an OpenAI-compatible server at "
                                    f"{self.base}: {e}") from None
        if self.model is None:
            if not models:
                raise ServerUnreachable(f"{self.base}/models lists no model; pass --model")
            self.model = models[0]
        return {"backend": "openai", "model": self.model}

    async def generate(self, spec: RequestSpec, request_id: str,
                       seed: int | None = None) -> RequestRecord:
        """Send one request and record its stream; HTTP errors end up in ``record.error``."""
        path, body = build_body(spec, self.model or "", force_output_len=self.force_output_len,
                                temperature=self.temperature, seed=seed)
        record = RequestRecord(request_id, spec.input_len, spec.output_len, tag=spec.tag)
        exact = False
        record.send_time = time.perf_counter()
        try:
            async with self._session.post(
                    self.base + path, json=body, headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
                if resp.status != 200:
                    record.error = f"HTTP {resp.status}: {_error_text(await resp.text())}"
                else:
                    async for event in _sse_events(resp.content):
                        if event == "[DONE]":
                            break
                        exact |= _record_event(record, json.loads(event))
                        if record.error:
                            break
            record.end_time = time.perf_counter()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            record.end_time = time.perf_counter()
            record.error = f"{type(e).__name__}: {e}"
        if record.error is None:
            if record.first_token_time is None:
                record.error = "stream ended without a token"
            elif not exact:
                _reconcile(record)
        return record


def _record_event(record: RequestRecord, event: dict) -> bool:
    """Fold one streamed event into ``record``; True if it counted tokens exactly."""
    now = time.perf_counter()
    if "error" in event:
        record.error = f"stream error: {_error_text(json.dumps(event))}"
        return False
    exact = False
    for choice in event.get("choices") or []:
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content") or ""
        ids = choice.get("token_ids")
        exact = ids is not None
        n = len(ids) if exact else (1 if text else 0)
        if n:
            record.add_chunk(now, n)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens") or 0
        record.completion_tokens = usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens") or 0
    return exact


def _reconcile(record: RequestRecord) -> None:
    """Without token ids, make the streamed count equal the usage's completion tokens."""
    extra = record.completion_tokens - record.streamed_tokens
    if record.completion_tokens and extra:
        last = max(i for i, n in enumerate(record.chunk_tokens) if n)
        record.chunk_tokens[last] = max(1, record.chunk_tokens[last] + extra)


async def _sse_events(stream: aiohttp.StreamReader):
    """The ``data:`` payloads of a server-sent event stream."""
    buf = b""
    async for piece in stream.iter_any():
        buf = (buf + piece).replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            data = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data).decode()


def _error_text(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return " ".join(text.split())[:200]
