# ruff: noqa: F811 (pytest fixtures imported from http_checks are parameters here)
"""The OpenAI-compatible HTTP API of one real 1P1D cluster (local Ray, SmolLM2 on CPU, KV
over loopback gRPC), driven by the official `openai` package and by raw HTTP: output equal
to the gRPC API's, `n` choices, the SSE framing, every refusal's status and JSON body.
Faults, disconnects, metrics and the benchmark are in test_http_faults.py."""

from __future__ import annotations

import openai
import pytest
from cluster_checks import assert_blocks_back
from http_checks import (  # the module fixtures every HTTP test module uses:
    CHAT,
    MODEL,
    PROMPT,
    grpc_client,  # noqa: F401
    http,  # noqa: F401
    http_cluster,
    oai,  # noqa: F401
    read_all_events,
    start_blocks,  # noqa: F401
    tokenizer,  # noqa: F401
)

pytestmark = pytest.mark.slow

MAX_QUEUE = 2
MAX_TOKENS_LIMIT = 128
MAX_REQUEST_BYTES = 4096
ROUTER = {"max_queue": MAX_QUEUE, "max_tokens_limit": MAX_TOKENS_LIMIT,
          "max_request_bytes": MAX_REQUEST_BYTES}
N = 8


@pytest.fixture(scope="module")
def served():
    with http_cluster(ROUTER) as served:
        yield served


def test_models_and_health(oai, http):
    (model,) = oai.models.list().data
    assert (model.id, model.owned_by, model.model_extra["max_model_len"]) == (MODEL, "pdserve",
                                                                              512)
    status, body, _ = http.request("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["mode"] == "disaggregated"


# ---- output through the openai client, equal to the gRPC API's -----------------------------


def test_chat_non_streaming_equals_grpc(oai, grpc_client, tokenizer, start_blocks):
    want = grpc_client.generate(CHAT, max_tokens=N, temperature=0, ignore_eos=True)
    r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0,
                                    extra_body={"ignore_eos": True})
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == want["text"]
    assert choice.finish_reason == "length"
    n_prompt = len(tokenizer.encode(tokenizer.apply_chat_template(CHAT)))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt, N, n_prompt + N)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert_blocks_back(grpc_client, start_blocks)


def test_chat_streaming_equals_non_streaming(oai, grpc_client, start_blocks):
    want = oai.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=N,
                                       temperature=0)
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=N, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == want.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == want.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert_blocks_back(grpc_client, start_blocks)


def test_completions_text_and_token_ids_equal_grpc(oai, grpc_client, tokenizer):
    want = grpc_client.generate(PROMPT, max_tokens=N, temperature=0, ignore_eos=True)
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                               extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].text == want["text"]
    assert r.choices[0].model_extra["token_ids"] == want["token_ids"]
    ids = tokenizer.encode(PROMPT)
    streamed = list(oai.completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == want["text"]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == N
    echoed = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                    echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + want["text"]


def test_seed_reproducible_and_equal_to_grpc(oai, grpc_client):
    params = dict(temperature=0.9, top_p=0.9, max_tokens=N)
    extra = {"top_k": 50, "ignore_eos": True}
    runs = {seed: [oai.completions.create(model=MODEL, prompt=PROMPT, seed=seed, **params,
                                          extra_body=extra).choices[0].text for _ in range(2)]
            for seed in (7, 1234)}
    assert all(a == b for a, b in runs.values())
    assert runs[7][0] != runs[1234][0]  # the seed really samples
    grpc = grpc_client.generate(PROMPT, seed=7, top_k=50, ignore_eos=True, **params)
    assert runs[7][0] == grpc["text"]


def test_stop_string(oai, grpc_client):
    free = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    text = free.choices[0].text
    stop = text.strip().split()[1]  # a word the free run produced after its first word
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                               stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and text.startswith(r.choices[0].text)
    assert r.choices[0].text == grpc_client.generate(PROMPT, max_tokens=N, temperature=0,
                                                     stop=[stop])["text"]


def test_logprobs(oai):
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                               logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == N
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy took the likeliest
    c = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0,
                                    logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == N and all(len(e.top_logprobs) == 2 for e in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)


def test_n_choices_each_equal_a_single_request_with_its_seed(oai, http, grpc_client,
                                                              start_blocks):
    params = dict(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0.9)
    r = oai.completions.create(n=2, seed=40, **params, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for i, c in enumerate(r.choices):
        alone = oai.completions.create(seed=40 + i, **params, extra_body={"ignore_eos": True})
        assert c.text == alone.choices[0].text
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == 2 * N
    conn, resp = http.open_stream("/v1/chat/completions", {
        "model": MODEL, "messages": CHAT, "max_tokens": N, "temperature": 0, "n": 2,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    try:
        events = read_all_events(resp)
    finally:
        conn.close()
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 2 * N
    texts = {0: "", 1: ""}
    for e in events[:-2]:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts[0] == texts[1] != ""  # greedy: both choices the same answer
    assert_blocks_back(grpc_client, start_blocks)


# ---- raw HTTP: SSE framing and errors ------------------------------------------------------


def test_raw_sse_chat_stream_shape_and_order(http, grpc_client, start_blocks):
    conn, resp = http.open_stream("/v1/chat/completions", {
        "model": MODEL, "messages": CHAT, "max_tokens": N, "temperature": 0, "stream": True,
        "ignore_eos": True, "stream_options": {"include_usage": True}})
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        events = read_all_events(resp)
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    ids = {e["id"] for e in events[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == MODEL for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    middle = chunks[1:-1]
    assert middle and all(set(e["choices"][0]["delta"]) == {"content"} for e in middle)
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    assert all(e["usage"] is None for e in chunks)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == N
    text = "".join(e["choices"][0]["delta"]["content"] for e in middle)
    assert text == grpc_client.generate(CHAT, max_tokens=N, temperature=0,
                                        ignore_eos=True)["text"]
    assert_blocks_back(grpc_client, start_blocks)


def test_raw_sse_completion_without_usage_option(http):
    conn, resp = http.open_stream("/v1/completions", {
        "model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True})
    try:
        events = read_all_events(resp)
    finally:
        conn.close()
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": "length"}
    assert all(e["object"] == "text_completion" for e in events[:-1])


def _body(**fields) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}


ERRORS = {
    # case: (path, body or raw bytes, token, status, param, message part)
    "not json": ("/v1/completions", b"{nope", "default", 400, None, "not valid JSON"),
    "no prompt": ("/v1/completions", {"model": MODEL}, "default", 400, "prompt", "required"),
    "empty prompt": ("/v1/completions", _body(prompt=""), "default", 400, "prompt", "empty"),
    "max_tokens 0": ("/v1/completions", _body(max_tokens=0), "default", 400, "max_tokens",
                     "max_tokens must be >= 1"),
    "max_tokens string": ("/v1/completions", _body(max_tokens="5"), "default", 400,
                          "max_tokens", "valid integer"),
    "max_tokens over limit": ("/v1/completions", _body(max_tokens=MAX_TOKENS_LIMIT + 1),
                              "default", 400, "max_tokens", f"limit of {MAX_TOKENS_LIMIT}"),
    "temperature": ("/v1/completions", _body(temperature=-1), "default", 400, "temperature",
                    "temperature"),
    "top_p": ("/v1/completions", _body(top_p=1.5), "default", 400, "top_p", "top_p"),
    "n above the queue": ("/v1/completions", _body(n=MAX_QUEUE + 1), "default", 400, "n",
                          f"this server has {MAX_QUEUE}"),
    "several prompts": ("/v1/completions", _body(prompt=["a", "b"]), "default", 400, "prompt",
                        "several prompts"),
    "penalty": ("/v1/completions", _body(presence_penalty=0.5), "default", 400,
                "presence_penalty", "not supported"),
    "token outside vocab": ("/v1/completions", _body(prompt=[1, 10**6]), "default", 400,
                            "prompt", "outside the vocabulary"),
    "bad role": ("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "wizard", "content": "hi"}]}, "default", 400, "messages[0].role", "role"),
    "tools": ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [{}]},
              "default", 400, "tools", "not supported"),
    "unknown model": ("/v1/completions", _body(model="gpt-17"), "default", 404, "model",
                      "does not exist"),
    "no token": ("/v1/completions", _body(), None, 401, None, "bearer token"),
    "wrong token": ("/v1/completions", _body(), "wrong", 401, None, "bearer token"),
    "too large": ("/v1/completions", _body(prompt="x" * MAX_REQUEST_BYTES), "default", 413,
                  None, "exceeded"),
    "unknown route": ("/v1/embeddings", _body(), "default", 404, None, "Not Found"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_status_and_openai_json(http, grpc_client, start_blocks, case):
    path, body, token, status, param, message = ERRORS[case]
    raw = body if isinstance(body, bytes) else None
    got, err, _ = http.request("POST", path, None if raw else body, token=token, raw=raw)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert message in err["error"]["message"], err
    assert err["error"]["param"] == param
    assert_blocks_back(grpc_client, start_blocks)


def test_wrong_method_is_405_json(http):
    status, err, _ = http.request("GET", "/v1/completions")
    assert status == 405 and err["error"]["message"] == "Method Not Allowed"


def test_openai_client_raises_typed_errors(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-17", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt=PROMPT, top_p=2.0)
    assert e.value.body["param"] == "top_p"
    bad = openai.OpenAI(base_url=oai.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
