"""The OpenAI-compatible HTTP API of one real 1P1D cluster (local Ray, SmolLM2 on CPU, KV
over loopback gRPC), driven by the official `openai` package and by raw HTTP: output equal
to the gRPC API's, the SSE framing, every error status, client disconnects, /metrics after
a known set of requests, and `pdserve bench --backend openai` against the gRPC backend."""

from __future__ import annotations

import json
import os
import time

import openai
import pytest
from cluster_checks import assert_blocks_back, free_blocks, worker_stats
from http_checks import Http, delta, read_all_events, read_event, sample, wait_for

from pdserve.bench.cli import main as bench_main
from pdserve.bench.report import load_report
from pdserve.cluster.background import BackgroundCluster
from pdserve.cluster.client import PdserveClient
from pdserve.cluster.config import parse_config
from pdserve.engine.loader.registry import open_model

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
TOKEN = "test-token-7f3a"
TOKEN_ENV = "PDSERVE_HTTP_TEST_TOKEN"
MAX_QUEUE = 2
MAX_TOKENS_LIMIT = 128
MAX_REQUEST_BYTES = 4096
CONFIG = {
    "model": {"name": MODEL, "max_model_len": 512},
    "kv": {"memory_mb": 32},
    "prefill": {"max_num_batched_tokens": 32},
    "router": {"port": 0, "http_port": 0, "max_queue": MAX_QUEUE,
               "max_tokens_limit": MAX_TOKENS_LIMIT, "max_request_bytes": MAX_REQUEST_BYTES,
               "auth_token_env": TOKEN_ENV, "handoff_retries": 0},
    # The first handoff fails: the fixture's first request shows what a failed handoff is.
    "debug": {"inject_transfer_failures": 1},
}
CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the tallest mountain on Earth?"}]
PROMPT = "The capital of France is"
N = 8


@pytest.fixture(scope="module")
def served():
    os.environ[TOKEN_ENV] = TOKEN
    try:
        with BackgroundCluster(parse_config(CONFIG)) as bg, \
                PdserveClient(bg.address, token=TOKEN, timeout=120) as grpc_client:
            http = Http(bg.http_url, TOKEN)
            failed = http.request("POST", "/v1/completions",
                                  {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
            yield bg, grpc_client, http, failed
    finally:
        os.environ.pop(TOKEN_ENV, None)


@pytest.fixture(scope="module")
def grpc_client(served) -> PdserveClient:
    return served[1]


@pytest.fixture(scope="module")
def http(served) -> Http:
    return served[2]


@pytest.fixture(scope="module")
def oai(served) -> openai.OpenAI:
    # No retries: a refused request must reach the test, not be sent again.
    return openai.OpenAI(base_url=served[0].http_url + "/v1", api_key=TOKEN, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def start_blocks(grpc_client) -> dict[str, int]:
    blocks = free_blocks(grpc_client)
    assert set(blocks) == {"prefill-0", "decode-0"}
    return blocks


@pytest.fixture(scope="module")
def tokenizer():
    return open_model(MODEL).tokenizer


def test_failed_handoff_is_503_in_openai_shape(served, grpc_client, start_blocks):
    status, body, _ = served[3]
    assert status == 503, body
    assert body["error"]["type"] == "service_unavailable"
    assert "injected transfer failure" in body["error"]["message"]
    assert_blocks_back(grpc_client, start_blocks)


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


def _long_stream(http: Http, **extra):
    return http.open_stream("/v1/completions", {
        "model": MODEL, "prompt": "Count from one to two hundred:", "max_tokens": 120,
        "temperature": 0, "ignore_eos": True, "stream": True, **extra})


def test_queue_full_is_429(http, grpc_client, start_blocks):
    streams = [_long_stream(http) for _ in range(MAX_QUEUE)]
    try:
        for _, resp in streams:
            assert resp.status == 200 and read_event(resp)  # in flight
        status, err, _ = http.request("POST", "/v1/completions", _body())
        assert status == 429 and err["error"]["code"] == "queue_full", err
        assert all(read_event(resp) for _, resp in streams)  # still streaming
    finally:
        for conn, _ in streams:
            conn.close()
    assert_blocks_back(grpc_client, start_blocks)


# ---- client disconnect ---------------------------------------------------------------------


def test_disconnect_mid_decode_frees_blocks_everywhere(http, grpc_client, start_blocks):
    aborted = grpc_client.stats().requests_aborted
    conn, resp = _long_stream(http)
    assert resp.status == 200 and read_event(resp) and read_event(resp)
    conn.close()
    assert_blocks_back(grpc_client, start_blocks)
    generated = worker_stats(grpc_client)["decode-0"].generated_tokens
    time.sleep(0.5)  # decoding really stopped, not just the stream
    assert worker_stats(grpc_client)["decode-0"].generated_tokens == generated
    assert grpc_client.stats().requests_aborted == aborted + 1


def test_disconnect_with_two_choices_aborts_both(http, grpc_client, start_blocks):
    aborted = grpc_client.stats().requests_aborted
    conn, resp = _long_stream(http, n=2)
    assert resp.status == 200
    seen = {json.loads(read_event(resp))["choices"][0]["index"] for _ in range(6)}
    assert seen == {0, 1}
    conn.close()
    assert_blocks_back(grpc_client, start_blocks)
    assert grpc_client.stats().requests_aborted == aborted + 2


def test_disconnect_during_a_non_streamed_request_frees_blocks(http, grpc_client,
                                                                start_blocks):
    """The client of a non-streamed request hangs up while its answer is being decoded."""
    aborted = grpc_client.stats().requests_aborted
    base = worker_stats(grpc_client)["decode-0"].generated_tokens
    conn = http.connect()
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True}),
        http.headers())
    wait_for(lambda: worker_stats(grpc_client)["decode-0"].generated_tokens > base + 2)
    conn.close()
    assert_blocks_back(grpc_client, start_blocks)
    assert worker_stats(grpc_client)["decode-0"].generated_tokens - base < 120
    assert grpc_client.stats().requests_aborted == aborted + 1


def test_disconnect_mid_prefill_frees_blocks_everywhere(http, grpc_client, start_blocks):
    """No byte was sent to the client yet (headers go out with the first token): the
    disconnect is still noticed and aborts the prefill and the decode reservation."""
    ids = [(i * 7919) % 40000 + 100 for i in range(400)]
    base = worker_stats(grpc_client)["prefill-0"].prompt_tokens_processed
    conn, _ = http.connect(), None
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": ids, "max_tokens": 8, "stream": True}), http.headers())
    wait_for(lambda: worker_stats(grpc_client)["prefill-0"].prompt_tokens_processed > base
              and worker_stats(grpc_client)["decode-0"].waiting)
    conn.close()
    assert_blocks_back(grpc_client, start_blocks)
    assert worker_stats(grpc_client)["prefill-0"].prompt_tokens_processed - base < len(ids)


# ---- metrics and the benchmark -------------------------------------------------------------


def test_metrics_count_exactly_what_was_sent(http, oai, grpc_client, tokenizer, start_blocks):
    before = http.metrics()
    lengths = (3, 5, 7)
    for n in lengths[:2]:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0,
                               extra_body={"ignore_eos": True})
    list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=lengths[2],
                                     temperature=0, stream=True,
                                     extra_body={"ignore_eos": True}))
    after = http.metrics()
    prompts = 2 * len(tokenizer.encode(PROMPT)) + len(
        tokenizer.encode(tokenizer.apply_chat_template(CHAT)))
    k = len(lengths)
    for name in ("pdserve:time_to_first_token_seconds_count",
                 "pdserve:e2e_request_latency_seconds_count",
                 "pdserve:request_time_per_output_token_seconds_count",
                 "pdserve:request_generation_tokens_count"):
        assert delta(after, before, name) == k, name
    assert delta(after, before, "pdserve:request_success_total", finished_reason="length") == k
    assert delta(after, before, "pdserve:generation_tokens_total") == sum(lengths)
    assert delta(after, before, "pdserve:request_generation_tokens_sum") == sum(lengths)
    assert delta(after, before, "pdserve:inter_token_latency_seconds_count") == sum(
        n - 1 for n in lengths)
    assert delta(after, before, "pdserve:prompt_tokens_total") == prompts
    assert delta(after, before, "pdserve:request_prompt_tokens_sum") == prompts
    assert delta(after, before, "pdserve:prefix_cache_queries_total") == prompts
    assert sample(after, "pdserve:request_success_total", finished_reason="error") == 1
    # Worker figures come from the stats poll: idle workers show every block free.
    assert_blocks_back(grpc_client, start_blocks)
    time.sleep(1.0)
    polled = http.metrics()
    for wid, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        labels = {"worker": wid, "role": role}
        assert sample(polled, "pdserve:kv_cache_free_blocks", **labels) == start_blocks[wid]
        assert sample(polled, "pdserve:kv_cache_usage_perc", **labels) == 0.0
    assert sample(polled, "pdserve:kv_handoffs_total", worker="prefill-0",
                  role="prefill") == worker_stats(grpc_client)["prefill-0"].handoffs


def test_bench_openai_backend_matches_grpc_backend(served, tmp_path, capsys):
    bg = served[0]
    common = ["--workload", "random", "--num-requests", "4", "--input-len", "16:40",
              "--output-len", "3:6", "--concurrency", "2", "--warmup", "0", "--seed", "11",
              "--api-key", TOKEN, "--no-progress", "--no-plots"]
    totals = {}
    for name, backend in (("grpc", ["--target", bg.address]),
                          ("openai", ["--backend", "openai", "--base-url", bg.http_url])):
        out = tmp_path / name
        assert bench_main([*backend, *common, "--out-dir", str(out)]) == 0, capsys.readouterr()
        (run,) = load_report(out / "bench.json")["runs"]
        records = run["records"]
        assert all(r.error is None for r in records), [r.error for r in records]
        totals[name] = (len(records), sum(r.prompt_tokens for r in records),
                        sum(r.completion_tokens for r in records),
                        sum(r.streamed_tokens for r in records),
                        [r.completion_tokens for r in records])
    assert totals["openai"] == totals["grpc"]
    assert totals["grpc"][0] == 4 and totals["grpc"][2] == totals["grpc"][3] > 0
