"""OpenAI request bodies become the gRPC API's GenerateRequest, or a 400 naming the field."""

from __future__ import annotations

import json

import pytest

from pdserve.router.openai_protocol import BadRequest, param_of, parse_chat, parse_completion


def body(**fields) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def test_completion_fields_map_to_sampling():
    p = parse_completion(body(prompt="hi", max_tokens=7, temperature=0.5, top_p=0.9, top_k=5,
                              min_p=0.1, seed=2**63, stop="x", stop_token_ids=[3],
                              ignore_eos=True, min_tokens=2, logprobs=3, stream=True,
                              stream_options={"include_usage": True}, return_token_ids=True))
    s = p.request.sampling
    assert p.request.prompt == "hi" and p.request.model == "m"
    assert (s.max_tokens, s.min_tokens, s.top_k, s.seed, s.logprobs) == (7, 2, 5, 2**63, 3)
    assert (s.temperature, s.top_p, s.min_p) == pytest.approx((0.5, 0.9, 0.1))
    assert list(s.stop) == ["x"] and list(s.stop_token_ids) == [3] and s.ignore_eos
    assert (p.kind, p.stream, p.include_usage, p.logprobs, p.return_token_ids) == (
        "completion", True, True, 3, True)
    assert not p.fill_max_tokens


def test_unset_fields_stay_unset_so_the_engine_defaults_apply():
    s = parse_completion(body(prompt="hi")).request.sampling
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs"):
        assert not s.HasField(name), name


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2, 3]]])
def test_token_id_prompts(prompt):
    assert list(parse_completion(body(prompt=prompt)).request.prompt_token_ids.ids) == [1, 2, 3]


def test_chat_messages_roles_parts_and_max_tokens():
    p = parse_chat(body(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                      "text": "b"}]}],
        logprobs=True, top_logprobs=4))
    msgs = [(m.role, m.content) for m in p.request.messages.messages]
    assert msgs == [("system", "be brief"), ("user", "ab")]
    assert p.fill_max_tokens and p.request.sampling.max_tokens == 1  # validated with 1, filled
    assert p.logprobs == 4
    assert parse_chat(body(messages=[{"role": "user", "content": "x"}],
                           max_completion_tokens=9)).request.sampling.max_tokens == 9


@pytest.mark.parametrize(("parse", "fields", "param", "message"), [
    (parse_completion, {"prompt": "x", "n": 0}, "n", "n must be in [1, 8]"),
    (parse_chat, {"messages": [{"role": "user", "content": "x"}], "n": 9}, "n", "n must be"),
    (parse_completion, {"prompt": "x", "best_of": 2}, "best_of", "best_of"),
    (parse_completion, {"prompt": ["a", "b"]}, "prompt", "several prompts"),
    (parse_completion, {"prompt": "x", "max_tokens": 1.5}, "max_tokens", "integer"),
    (parse_completion, {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    (parse_completion, {"prompt": "x", "seed": -1}, "seed", "out of range"),
    (parse_completion, {"prompt": "x", "frequency_penalty": 1.0}, "frequency_penalty",
     "not supported"),
    (parse_completion, {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias", "not supp"),
    (parse_completion, {"prompt": "x", "echo": True, "logprobs": 1}, "echo", "echo"),
    (parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options", "stream: true"),
    (parse_completion, {}, "prompt", "required"),
    (parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "only text parts"),
    (parse_chat, {"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    (parse_chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs", "logprobs: true"),
    (parse_chat, {"messages": [{"role": "user", "content": "x"}],
                  "response_format": {"type": "json_object"}}, "response_format", "text"),
    (parse_chat, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                  "max_completion_tokens": 4}, "max_completion_tokens", "differ"),
])
def test_bad_bodies_name_the_field(parse, fields, param, message):
    with pytest.raises(BadRequest) as e:
        parse(body(**fields))
    assert e.value.param == param
    assert message in str(e.value)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"null"])
def test_not_a_json_object(raw):
    with pytest.raises(BadRequest) as e:
        parse_completion(raw)
    assert e.value.param is None


@pytest.mark.parametrize(("message", "kind", "param"), [
    ("sampling: top_p must be in (0, 1], got 2.0", "completion", "top_p"),
    ("sampling.max_tokens 300 is above this server's limit of 256", "chat", "max_tokens"),
    ("prompt_token_ids: id 100000 outside the vocabulary", "completion", "prompt"),
    ("prompt (500 tokens) + max_tokens (16) = 516 exceeds", "chat", "messages"),
    ("messages[1].role must be system, user or assistant", "chat", "messages[1].role"),
    ("sampling: logprobs must be None or in [0, 20], got 50", "chat", "top_logprobs"),
    ("request is 5000 bytes; the limit is 4096", "completion", None),
])
def test_validation_messages_map_to_openai_params(message, kind, param):
    assert param_of(message, kind) == param


def test_n_choices_are_n_requests_with_consecutive_seeds():
    p = parse_completion(body(prompt="hi", n=3, seed=2**64 - 2, best_of=3))
    reqs = p.choice_requests()
    assert [r.sampling.seed for r in reqs] == [2**64 - 2, 2**64 - 1, 0]
    assert all(r.prompt == "hi" for r in reqs)
    unseeded = parse_chat(body(messages=[{"role": "user", "content": "x"}], n=2))
    assert [r.sampling.HasField("seed") for r in unseeded.choice_requests()] == [False, False]
