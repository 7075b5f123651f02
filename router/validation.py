"""Turn a `GenerateRequest` into token ids and sampling params, or a clear field error.

Everything a client can get wrong is caught here, before any worker is touched, so a bad
request costs nothing and changes nothing.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import ChatTemplateError, TextTokenizer
from pdserve.proto import pb


class InvalidRequest(ValueError):
    """Bad client input; the message names the field."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_model_len: int
    max_tokens_limit: int
    max_prompt_tokens: int | None
    vocab_size: int
    model_name: str


# Bounds on the fields that the token limits (prompt, max_tokens, context) do not bound.
# Each is far above what a real client sends and far below what would hurt: a request id
# travels with every KV chunk and log line, stop strings are matched on every token, so an
# unbounded one turns a small request into work or messages no worker was sized for.
MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/@+=~-]+")
REQUEST_ID_CHARSET = "letters, digits and . _ : / @ + = ~ -"
MAX_MODEL_NAME_CHARS = 256
MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256

_ROLES = ("system", "user", "assistant")


def check_request_id(rid: str, limit: int = MAX_REQUEST_ID_CHARS) -> None:
    """A client's request id: at most `limit` characters of a log- and URL-safe set."""
    if len(rid) > limit:
        raise InvalidRequest(f"request_id is {len(rid)} characters; the limit is {limit}")
    if rid and not REQUEST_ID_PATTERN.fullmatch(rid):
        raise InvalidRequest(f"request_id may hold only {REQUEST_ID_CHARSET}")


def check_model_name(name: str) -> None:
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise InvalidRequest(f"model name is {len(name)} characters; the limit is "
                             f"{MAX_MODEL_NAME_CHARS}")


def check_sizes(req: pb.GenerateRequest, limits: Limits) -> None:
    """The request's strings and repeated fields within their bounds, checked before any of
    them is read further (tokenized, scanned, echoed in an error)."""
    check_request_id(req.request_id)
    check_model_name(req.model)
    s = req.sampling
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"sampling.stop has {len(s.stop)} strings; the limit is "
                             f"{MAX_STOP_STRINGS}")
    for i, stop in enumerate(s.stop):
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"sampling.stop: string {i} is {len(stop)} characters; the "
                                 f"limit is {MAX_STOP_CHARS}")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"sampling.stop_token_ids has {len(s.stop_token_ids)} ids; the "
                             f"limit is {MAX_STOP_TOKEN_IDS}")
    kind = req.WhichOneof("input")
    if kind == "messages" and len(req.messages.messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages has {len(req.messages.messages)} entries; the limit "
                             f"is {MAX_MESSAGES}")
    if kind == "prompt_token_ids" and len(req.prompt_token_ids.ids) > limits.max_model_len:
        raise InvalidRequest(f"prompt_token_ids has {len(req.prompt_token_ids.ids)} ids; this "
                             f"server's context length is {limits.max_model_len}")


_SAMPLING_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
                    "seed", "logprobs")


def sampling_params(msg: pb.SamplingParams, limits: Limits) -> SamplingParams:
    kwargs = {f: getattr(msg, f) for f in _SAMPLING_FIELDS if msg.HasField(f)}
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    kwargs["ignore_eos"] = msg.ignore_eos
    # The router fixes the seed so prefill and decode draw the same random numbers.
    kwargs.setdefault("seed", secrets.randbits(63))
    try:
        params = SamplingParams(**kwargs)
        params.validate_against(limits.vocab_size)
    except ValueError as e:
        raise InvalidRequest(f"sampling: {e}") from None
    if params.max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"sampling.max_tokens {params.max_tokens} is above this server's limit of "
            f"{limits.max_tokens_limit}"
        )
    return params


def prompt_ids(req: pb.GenerateRequest, tok: TextTokenizer, limits: Limits) -> list[int]:
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("one of prompt, messages or prompt_token_ids is required")
    if kind == "prompt":
        if not req.prompt.strip():
            raise InvalidRequest("prompt is empty")
        ids = tok.encode(req.prompt)
    elif kind == "messages":
        msgs = [{"role": m.role, "content": m.content} for m in req.messages.messages]
        if not msgs:
            raise InvalidRequest("messages is empty")
        for i, m in enumerate(msgs):
            if m["role"] not in _ROLES:
                raise InvalidRequest(f"messages[{i}].role must be system, user or assistant, "
                                     f"got {_shown(m['role'])}")
        try:
            ids = tok.encode(tok.apply_chat_template(msgs))
        except ChatTemplateError as e:
            raise InvalidRequest(f"messages: {e}") from None
    else:
        ids = list(req.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequest("prompt_token_ids is empty")
        bad = [i for i in ids if not 0 <= i < limits.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_token_ids: id {bad[0]} outside the vocabulary "
                                 f"[0, {limits.vocab_size})")
    if not ids:
        raise InvalidRequest("prompt is empty after tokenization")
    if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; this server accepts at most "
                             f"{limits.max_prompt_tokens}")
    return ids


def validate(req: pb.GenerateRequest, tok: TextTokenizer, limits: Limits):
    """(prompt token ids, SamplingParams) or InvalidRequest."""
    check_sizes(req, limits)
    if req.model and req.model != limits.model_name:
        raise InvalidRequest(f"model {req.model!r} is not served here; this server serves "
                             f"{limits.model_name!r}")
    params = sampling_params(req.sampling, limits)
    ids = prompt_ids(req, tok, limits)
    total = len(ids) + params.max_tokens
    if total > limits.max_model_len:
        raise InvalidRequest(
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
            f"this server's context length of {limits.max_model_len}"
        )
    return ids, params


def _shown(value: str, limit: int = 40) -> str:
    """A client's string as an error message quotes it: never more than `limit` chars."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} chars)"
