"""Every string and repeated field of a request is bounded at the door, with an error that
names the field and the limit: the gRPC `GenerateRequest` (router.validation, shared with
HTTP through FrontDoor) and the fields only an OpenAI body carries (router.openai_protocol).
"""

from __future__ import annotations

import json

import pytest

from pdserve.engine.loader.model_files import open_tokenizer
from pdserve.proto import pb
from pdserve.router.openai_protocol import (
    MAX_NAME_CHARS,
    MAX_USER_CHARS,
    BadRequest,
    param_of,
    parse_chat,
    parse_completion,
)
from pdserve.router.validation import (
    MAX_MESSAGES,
    MAX_MODEL_NAME_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    InvalidRequest,
    Limits,
    validate,
)

MODEL = "smollm2-135m-instruct"
LIMITS = Limits(max_model_len=256, max_tokens_limit=64, max_prompt_tokens=None,
                vocab_size=49152, model_name=MODEL)


@pytest.fixture(scope="module")
def tok():
    return open_tokenizer(MODEL)


def request(**fields) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt="Hello there", **fields)
    req.sampling.max_tokens = 4
    return req


def at_limit() -> pb.GenerateRequest:
    """A request with every bounded field exactly at its bound."""
    req = request(request_id="a" * MAX_REQUEST_ID_CHARS)
    req.sampling.stop.extend(["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)
    req.sampling.stop_token_ids.extend([7] * MAX_STOP_TOKEN_IDS)
    return req


def test_every_field_at_its_bound_is_accepted(tok):
    ids, params = validate(at_limit(), tok, LIMITS)
    assert ids and len(params.stop) == MAX_STOP_STRINGS
    msgs = pb.GenerateRequest(request_id="chatcmpl-0a1B.2:3/4@5+6=7~8_9")
    msgs.messages.messages.extend([pb.ChatMessage(role="user", content="hi")] * 4)
    validate(msgs, tok, LIMITS)
    validate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * 200)), tok, LIMITS)


def _over(field: str) -> pb.GenerateRequest:
    req = at_limit()
    if field == "request_id":
        req.request_id = "a" * 900_000  # what issue 12 sent: accepted, then broke a handoff
    elif field == "model":
        req.model = "m" * (MAX_MODEL_NAME_CHARS + 1)
    elif field == "stop count":
        req.sampling.stop.append("y")
    elif field == "stop length":
        req.sampling.stop[3] = "z" * (MAX_STOP_CHARS + 1)
    elif field == "stop_token_ids":
        req.sampling.stop_token_ids.append(8)
    elif field == "messages":
        req.messages.messages.extend(
            [pb.ChatMessage(role="user", content="hi")] * (MAX_MESSAGES + 1))
    elif field == "prompt_token_ids":
        req.prompt_token_ids.ids.extend([5] * (LIMITS.max_model_len + 1))
    return req


@pytest.mark.parametrize("field,message", [
    ("request_id", f"request_id is 900000 characters; the limit is {MAX_REQUEST_ID_CHARS}"),
    ("model", f"model name is {MAX_MODEL_NAME_CHARS + 1} characters; the limit is "
              f"{MAX_MODEL_NAME_CHARS}"),
    ("stop count", f"sampling.stop has {MAX_STOP_STRINGS + 1} strings; the limit is "
                   f"{MAX_STOP_STRINGS}"),
    ("stop length", f"sampling.stop: string 3 is {MAX_STOP_CHARS + 1} characters; the limit "
                    f"is {MAX_STOP_CHARS}"),
    ("stop_token_ids", f"sampling.stop_token_ids has {MAX_STOP_TOKEN_IDS + 1} ids; the limit "
                       f"is {MAX_STOP_TOKEN_IDS}"),
    ("messages", f"messages has {MAX_MESSAGES + 1} entries; the limit is {MAX_MESSAGES}"),
    ("prompt_token_ids", f"prompt_token_ids has {LIMITS.max_model_len + 1} ids; this "
                         f"server's context length is {LIMITS.max_model_len}"),
])
def test_one_past_a_bound_is_refused_naming_field_and_limit(tok, field, message):
    with pytest.raises(InvalidRequest) as e:
        validate(_over(field), tok, LIMITS)
    assert str(e.value) == message


@pytest.mark.parametrize("rid", ["has space", "new\nline", "semi;colon", "é", "a\x00b"])
def test_request_id_charset(tok, rid):
    with pytest.raises(InvalidRequest, match=r"request_id may hold only letters, digits"):
        validate(request(request_id=rid), tok, LIMITS)


def test_an_error_quotes_at_most_a_little_of_a_client_string(tok):
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="r" * 100_000, content="hi")]))
    with pytest.raises(InvalidRequest) as e:
        validate(req, tok, LIMITS)
    assert len(str(e.value)) < 200 and "(100000 chars)" in str(e.value)


# ---- the OpenAI bodies ---------------------------------------------------------------------

def chat(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def completion(**fields) -> bytes:
    return json.dumps({"prompt": "hi", **fields}).encode()


@pytest.mark.parametrize("raw,param,message", [
    (chat(user="u" * (MAX_USER_CHARS + 1)), "user",
     f"user is {MAX_USER_CHARS + 1} characters; the limit is {MAX_USER_CHARS}"),
    (completion(model="m" * (MAX_MODEL_NAME_CHARS + 1)), "model",
     f"model is {MAX_MODEL_NAME_CHARS + 1} characters; the limit is {MAX_MODEL_NAME_CHARS}"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}).encode(),
     "messages", f"messages has {MAX_MESSAGES + 1} entries; the limit is {MAX_MESSAGES}"),
    (json.dumps({"messages": [{"role": "user", "content": "hi",
                               "name": "n" * (MAX_NAME_CHARS + 1)}]}).encode(),
     "messages[0].name",
     f"messages[0].name is {MAX_NAME_CHARS + 1} characters; the limit is {MAX_NAME_CHARS}"),
    (completion(request_id="r" * 900_000), "request_id",
     f"request_id is 900000 characters; the limit is {MAX_REQUEST_ID_CHARS}"),
    (chat(request_id="r" * MAX_REQUEST_ID_CHARS, n=3), "request_id",
     f"request_id is {MAX_REQUEST_ID_CHARS} characters; the limit is "
     f"{MAX_REQUEST_ID_CHARS - 2} with n=3"),
    (chat(request_id="no spaces"), "request_id", None),
])
def test_openai_only_fields_are_bounded(raw, param, message):
    parse = parse_chat if b"messages" in raw else parse_completion
    with pytest.raises(BadRequest) as e:
        parse(raw)
    assert e.value.param == param
    if message:
        assert str(e.value) == message


def test_openai_request_id_reaches_every_choice_distinct():
    parsed = parse_chat(chat(request_id="abc", n=3, seed=1))
    assert [r.request_id for r in parsed.choice_requests()] == ["abc-0", "abc-1", "abc-2"]
    assert parse_completion(completion(request_id="abc")).request.request_id == "abc"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_door_limit_messages_map_to_the_openai_field(tok, kind):
    """The door's messages (shared with gRPC) name a field an OpenAI client knows."""
    for field, param in [("request_id", "request_id"), ("model", "model"),
                         ("stop count", "stop"), ("stop length", "stop"),
                         ("stop_token_ids", "stop_token_ids")]:
        with pytest.raises(InvalidRequest) as e:
            validate(_over(field), tok, LIMITS)
        assert param_of(str(e.value), kind) == param, (field, str(e.value))
