"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) -> `pb.GenerateRequest`.

The HTTP front end validates nothing about sampling itself: it converts the body into the
same `GenerateRequest` the gRPC API takes, and `FrontDoor.admit` applies the one set of
checks and limits. Here only the shape is checked (types, with pydantic in strict mode, so
`"max_tokens": "5"` is an error, not 5) and fields this server cannot honour are refused
with a 400 naming them instead of being silently ignored: `best_of` above `n`, several
prompts in one request, penalties, `logit_bias`, `suffix`, tools, non-text response
formats and content parts. Unknown fields are ignored, as OpenAI-compatible servers do.

`n` choices are `n` requests through the router, sampled with seeds `seed`, `seed + 1`, ...
(or `n` random seeds), so each choice is reproducible alone.

Extensions (vLLM's names): `top_k`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`return_token_ids`, `request_id` (choice i of n > 1 runs as `request_id-i`).

Every string and list a body may carry is bounded: those that become part of the
`GenerateRequest` by `FrontDoor.admit` (router.validation), the rest (`user`, a message's
`name`, the model name that a 404 would quote) here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pdserve.proto import pb
from pdserve.router.validation import (
    MAX_MESSAGES,
    MAX_MODEL_NAME_CHARS,
    MAX_REQUEST_ID_CHARS,
    InvalidRequest,
    check_request_id,
)

MAX_N = 8  # choices per request; each holds a place in the router's queue
MAX_USER_CHARS = 256  # OpenAI's end-user id: accepted, not used
MAX_NAME_CHARS = 64  # a chat message's participant name: accepted, not used


class BadRequest(ValueError):
    """A body that cannot become a GenerateRequest; `param` names the field (or None)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    user: str | None = None
    request_id: str | None = None
    # Accepted only at their neutral values: the engine has no penalties or biases.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessageBody(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatBody(_Common):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Parsed:
    """A request ready for `FrontDoor.admit`, and how to shape its answer."""

    kind: Literal["completion", "chat"]
    request: pb.GenerateRequest
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token in the answer; None: no logprobs
    echo: bool
    return_token_ids: bool
    fill_max_tokens: bool  # max_tokens unset on a chat request: as many as fit
    model: str | None
    n: int = 1

    def choice_requests(self) -> list[pb.GenerateRequest]:
        """One GenerateRequest per choice; choice i samples with seed + i."""
        if self.n == 1:
            return [self.request]
        out = []
        for i in range(self.n):
            req = pb.GenerateRequest()
            req.CopyFrom(self.request)
            if req.sampling.HasField("seed"):
                req.sampling.seed = (req.sampling.seed + i) % 2**64
            if req.request_id:  # ids must differ between requests in flight
                req.request_id = f"{req.request_id}-{i}"
            out.append(req)
        return out


def parse_completion(raw: bytes) -> Parsed:
    body = _load(CompletionBody, raw)
    req = pb.GenerateRequest()
    _set_prompt(req, body.prompt)
    if body.suffix:
        raise BadRequest("suffix is not supported", "suffix")
    if body.best_of not in (None, 1, body.n):
        raise BadRequest("best_of above n is not supported", "best_of")
    if body.echo and body.logprobs is not None:
        raise BadRequest("echo with logprobs (prompt logprobs) is not supported", "echo")
    _fill_sampling(req, body, body.max_tokens, body.logprobs)
    return _parsed("completion", req, body, body.logprobs, body.echo, fill=False)


def parse_chat(raw: bytes) -> Parsed:
    body = _load(ChatBody, raw)
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise BadRequest(f"{name} (function calling) is not supported", name)
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise BadRequest("only response_format {'type': 'text'} is supported",
                         "response_format")
    if len(body.messages) > MAX_MESSAGES:
        raise BadRequest(f"messages has {len(body.messages)} entries; the limit is "
                         f"{MAX_MESSAGES}", "messages")
    req = pb.GenerateRequest()
    req.messages.SetInParent()
    for i, m in enumerate(body.messages):
        if m.name is not None and len(m.name) > MAX_NAME_CHARS:
            raise BadRequest(f"messages[{i}].name is {len(m.name)} characters; the limit is "
                             f"{MAX_NAME_CHARS}", f"messages[{i}].name")
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for it
        req.messages.messages.add(role=role, content=_text(m.content, i))
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise BadRequest("max_tokens and max_completion_tokens differ; send one",
                         "max_completion_tokens")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    fill = max_tokens is None
    if fill:
        # As many tokens as fit (FrontDoor.admit fills them in); validate with the fewest.
        max_tokens = max(1, body.min_tokens or 0)
    _fill_sampling(req, body, max_tokens, logprobs)
    return _parsed("chat", req, body, logprobs, False, fill=fill)


def _parsed(kind, req, body: _Common, logprobs, echo, fill: bool) -> Parsed:
    if not 1 <= body.n <= MAX_N:
        raise BadRequest(f"n must be in [1, {MAX_N}]", "n")
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    if body.model and len(body.model) > MAX_MODEL_NAME_CHARS:
        raise BadRequest(f"model is {len(body.model)} characters; the limit is "
                         f"{MAX_MODEL_NAME_CHARS}", "model")
    if body.user is not None and len(body.user) > MAX_USER_CHARS:
        raise BadRequest(f"user is {len(body.user)} characters; the limit is "
                         f"{MAX_USER_CHARS}", "user")
    if body.request_id:
        # Room for the "-i" that tells the choices of n > 1 apart.
        suffix = len(f"-{body.n - 1}") if body.n > 1 else 0
        try:
            check_request_id(body.request_id, MAX_REQUEST_ID_CHARS - suffix)
        except InvalidRequest as e:
            raise BadRequest(str(e) + (f" with n={body.n}" if suffix else ""),
                             "request_id") from None
        req.request_id = body.request_id
    if body.model:
        req.model = body.model
    return Parsed(kind, req, body.stream,
                  bool(body.stream_options and body.stream_options.include_usage), logprobs,
                  echo, body.return_token_ids, fill, body.model, body.n)


def _load(model: type[BaseModel], raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "json_invalid":
            raise BadRequest(f"body is not valid JSON: {err['msg']}") from None
        if err["type"] == "model_type":
            raise BadRequest("body must be a JSON object") from None
        raise BadRequest(f"{param or 'body'}: {err['msg']}", param) from None


def _param(loc) -> str | None:
    """`('messages', 1, 'content')` -> `messages[1].content` (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            break
    return out or None


def _set_prompt(req: pb.GenerateRequest, prompt) -> None:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise BadRequest("prompt: several prompts in one request are not supported; "
                             "send one request per prompt", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.SetInParent()
        try:
            req.prompt_token_ids.ids.extend(prompt)
        except (ValueError, TypeError):
            raise BadRequest("prompt: token ids must be 32-bit integers", "prompt") from None


def _text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise BadRequest(f"messages[{index}].content is required", f"messages[{index}].content")
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise BadRequest(f"messages[{index}].content[{j}]: only text parts are supported, "
                             f"got {part.type!r}", f"messages[{index}].content")
        texts.append(part.text)
    return "".join(texts)


_NEUTRAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def _fill_sampling(req: pb.GenerateRequest, body: _Common, max_tokens: int | None,
                   logprobs: int | None) -> None:
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise BadRequest(f"{name} is not supported (only {neutral})", name)
    if body.logit_bias:
        raise BadRequest("logit_bias is not supported", "logit_bias")
    s = req.sampling
    s.SetInParent()
    values = {"max_tokens": max_tokens, "min_tokens": body.min_tokens,
              "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
              "min_p": body.min_p, "seed": body.seed, "logprobs": logprobs}
    for name, value in values.items():
        if value is None:
            continue
        try:
            setattr(s, name, value)
        except (ValueError, TypeError):
            raise BadRequest(f"{name} {value!r} is out of range", name) from None
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    s.stop.extend(stop)
    try:
        s.stop_token_ids.extend(body.stop_token_ids or [])
    except (ValueError, TypeError):
        raise BadRequest("stop_token_ids must be 32-bit integers", "stop_token_ids") from None
    s.ignore_eos = body.ignore_eos


_FIELD = re.compile(r"^(?:sampling[:.] ?)?([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)?)\b")


def param_of(message: str, kind: str) -> str | None:
    """The request field a validation message (router.validation) is about, in the OpenAI
    body's names: `sampling: top_p must be ...` -> `top_p`, `prompt_token_ids: ...` ->
    `prompt`, a chat's `logprobs` -> `top_logprobs`."""
    m = _FIELD.match(message)
    if m is None:
        return None
    field = m.group(1)
    if field.startswith("prompt"):
        return "messages" if kind == "chat" else "prompt"
    if field == "logprobs" and kind == "chat":
        return "top_logprobs"
    if field.startswith("messages"):
        return field
    return field if field in _Common.model_fields or field == "logprobs" else None


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}

