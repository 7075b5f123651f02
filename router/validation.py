"""Turn a `GenerateRequest` into token ids and sampling params, or a clear field error.

Everything a client can get wrong is caught here, before any worker is touched, so a bad
request costs nothing and changes nothing.
"""

from __future__ import annotations

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
            if m["role"] not in ("system", "user", "assistant"):
                raise InvalidRequest(f"messages[{i}].role must be system, user or assistant, "
                                     f"got {m['role']!r}")
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
