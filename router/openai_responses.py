"""OpenAI response objects of one request, built from its output chunks.

Streaming follows OpenAI's event order: (chat) a first event with `delta.role`, then one
event per chunk that carries text or tokens, then an event with an empty delta (chat) or
empty text (completions) and the `finish_reason`, then, with
`stream_options.include_usage`, one event with `choices: []` and the usage (every other
event then has `"usage": null`); the HTTP layer ends the stream with `data: [DONE]`.
Non-streaming answers are the same chunks folded into one object. With `n` choices each
has its own `Answer` (its `index`); the events of all choices interleave as they come, and
`whole_response` / `usage_event` join them (prompt tokens once, completion tokens summed).
"""

from __future__ import annotations

import time

from pdserve.engine.tokenizer import TextTokenizer
from pdserve.router.frontdoor import ChunkFields
from pdserve.router.openai_protocol import Parsed


class Answer:
    """Accumulates one request's chunks; emits streaming events or the whole response."""

    def __init__(self, parsed: Parsed, request_id: str, model: str, prompt_ids: list[int],
                 tokenizer: TextTokenizer, index: int = 0):
        self.parsed = parsed
        self.chat = parsed.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.index = index
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list = []  # chat: content entries; completions: (token, lp, top, offset)
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.started = False
        self.offset = 0  # characters of text so far (completions' text_offset)
        if parsed.echo:
            prompt = parsed.request
            echo = prompt.prompt if prompt.WhichOneof("input") == "prompt" else \
                tokenizer.decode(prompt_ids)
            self.text.append(echo)
            self.offset = len(echo)

    # ---- folding chunks ------------------------------------------------------------------

    def absorb(self, c: ChunkFields) -> tuple[str, list[int], object]:
        """Add a chunk; returns its (text, token ids, logprobs in the answer's format)."""
        text = c.text
        if not self.started and self.parsed.echo:
            text = self.text[0] + text
        self.started = True
        self.text.append(c.text)
        self.token_ids += c.token_ids
        lps = self._logprobs(c) if self.parsed.logprobs is not None else None
        if c.finished and self.finish_reason is None:
            self.finish_reason = c.finish_reason or "stop"
            self.usage = {"prompt_tokens": c.prompt_tokens,
                          "completion_tokens": c.completion_tokens,
                          "total_tokens": c.prompt_tokens + c.completion_tokens,
                          "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}
        return text, c.token_ids, lps

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, c: ChunkFields):
        if self.chat:
            entries = [{"token": (s := self._token(t)), "logprob": lp,
                        "bytes": list(s.encode()),
                        "top_logprobs": [{"token": (a := self._token(i)), "logprob": v,
                                          "bytes": list(a.encode())} for i, v in top]}
                       for t, lp, top in c.logprobs]
            self.logprobs += entries
            return {"content": entries}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in c.logprobs:
            s = self._token(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._token(i): v for i, v in top})
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        self.logprobs.append(out)
        return out

    # ---- streaming -----------------------------------------------------------------------

    def events(self, c: ChunkFields) -> list[dict]:
        """The SSE payloads for one chunk (possibly none)."""
        first = not self.started
        text, ids, lps = self.absorb(c)
        out = []
        if first and self.chat:
            out.append(self._event({"role": "assistant", "content": ""}, None, None, None))
        if text or ids:
            payload = {"content": text} if self.chat else text
            out.append(self._event(payload, lps, ids, None))
        if c.finished:
            out.append(self._event({} if self.chat else "", None, None, self.finish_reason))
        return out

    def _event(self, payload, lps, ids, finish_reason) -> dict:
        choice = {"index": self.index, ("delta" if self.chat else "text"): payload,
                  "logprobs": lps,
                  "finish_reason": finish_reason}
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(ids or [])
        event = {"id": self.id, "object": self._object(chunk=True), "created": self.created,
                 "model": self.model, "choices": [choice]}
        if self.parsed.include_usage:
            event["usage"] = None
        return event

    def _object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    # ---- whole answer --------------------------------------------------------------------

    def choice(self) -> dict:
        """This choice of the non-streamed response."""
        text = "".join(self.text)
        choice: dict = {"index": self.index, "finish_reason": self.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = {"content": self.logprobs} if self.parsed.logprobs is not None \
                else None
        else:
            choice["text"] = text
            choice["logprobs"] = _merge_completion_logprobs(self.logprobs) \
                if self.parsed.logprobs is not None else None
        if self.parsed.return_token_ids:
            choice["token_ids"] = self.token_ids
        return choice


def joint_usage(answers: list[Answer]) -> dict | None:
    """Usage of all choices: the prompt once, completion tokens summed."""
    if any(a.usage is None for a in answers):
        return None
    first = answers[0].usage
    completion = sum(a.usage["completion_tokens"] for a in answers)
    return {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion,
            "total_tokens": first["prompt_tokens"] + completion,
            "prompt_tokens_details": first["prompt_tokens_details"]}


def whole_response(answers: list[Answer]) -> dict:
    """The non-streamed response object of every choice."""
    a = answers[0]
    body = {"id": a.id, "object": a._object(chunk=False), "created": a.created,
            "model": a.model, "choices": [x.choice() for x in answers],
            "usage": joint_usage(answers)}
    if a.parsed.return_token_ids:
        body["prompt_token_ids"] = a.prompt_ids
    return body


def usage_event(answers: list[Answer]) -> dict:
    """The streamed usage event (`stream_options.include_usage`), after every choice."""
    a = answers[0]
    return {"id": a.id, "object": a._object(chunk=True), "created": a.created,
            "model": a.model, "choices": [], "usage": joint_usage(answers)}


def _merge_completion_logprobs(parts: list[dict]) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in out:
            out[k] += p[k]
    return out
