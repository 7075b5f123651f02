"""One real 1P1D cluster (local Ray, SmolLM2 on CPU, KV over loopback gRPC) driven through
the public gRPC API: output against HF transformers and the offline engine, streaming,
usage, cancellation at every stage, bad input and overload."""

from __future__ import annotations

import os
import time

import grpc
import pytest
from cluster_checks import (
    assert_blocks_back,
    cluster_fixtures,
    collect,
    free_blocks,
    hf_greedy,
    worker_stats,
)

from pdserve.cluster.client import PdserveClient
from pdserve.cluster.config import parse_config
from pdserve.cluster.thread_budget import local_thread_budget, machine_cores
from pdserve.engine import SamplingParams
from pdserve.engine.loader.registry import open_model
from pdserve.proto import pb

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 512
PREFILL_BUDGET = 32  # tokens per prefill step: long prompts take many chunks
MAX_QUEUE = 2
MAX_TOKENS_LIMIT = 256

CONFIG = {
    "model": {"name": MODEL, "max_model_len": MAX_MODEL_LEN},
    "transport": "grpc",
    "kv": {"memory_mb": 32},
    "prefill": {"max_num_batched_tokens": PREFILL_BUDGET},
    "router": {"max_queue": MAX_QUEUE, "max_tokens_limit": MAX_TOKENS_LIMIT},
}

LONG_TEXT = (
    "Once upon a time, in a land far away, there lived a dragon who loved to read books "
    "about the stars. Every night the dragon would climb the tallest hill, open a book, and"
)
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the tallest mountain on Earth?"},
]
GREEDY_N = 12
PROMPTS = {"short": "The capital of France is", "tiny": "Hi", "long": LONG_TEXT, "chat": CHAT}


served, client, _ = cluster_fixtures(CONFIG)


@pytest.fixture(scope="module")
def start_blocks(client) -> dict[str, int]:
    """Free blocks per worker of the idle cluster: every test must leave them there."""
    blocks = free_blocks(client)
    assert set(blocks) == {"prefill-0", "decode-0"}
    return blocks


@pytest.fixture(scope="module")
def tokenizer():
    return open_model(MODEL).tokenizer


def prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.encode(tokenizer.apply_chat_template(prompt))


def assert_next_request_ok(client: PdserveClient) -> None:
    out = client.generate("Hi", max_tokens=2, temperature=0, ignore_eos=True)
    assert len(out["token_ids"]) == 2 and out["finish_reason"] == "length"


# ---- correctness ---------------------------------------------------------------------------


def test_health_and_models(client):
    h = client.health()
    assert (h.serving, h.prefill_workers, h.decode_workers, h.mode) == (
        True, 1, 1, "disaggregated")
    (model,) = client.generation.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert (model.name, model.max_model_len, model.block_size) == (MODEL, MAX_MODEL_LEN, 16)


def test_workers_run_with_the_thread_budget(served):
    """`threads: auto` became a split of this machine's cores (decode first), and each
    worker process runs that many torch threads with passive OpenMP waiting, at normal
    priority (Ray's default for worker processes is niceness 15)."""
    bg, _ = served
    budget = local_thread_budget(parse_config(CONFIG), machine_cores())
    infos = {i["role"]: i for i in bg.cluster.ready_info}
    for role in ("prefill", "decode"):
        assert infos[role]["threads"] == budget[role]
        assert infos[role]["omp_wait_policy"] == "PASSIVE"
        assert os.getpriority(os.PRIO_PROCESS, infos[role]["pid"]) == 0


@pytest.fixture(scope="module")
def offline_greedy(llm, tokenizer) -> dict:
    """The offline engine's greedy outputs for PROMPTS, in one batch."""
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS.values()]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=GREEDY_N,
                                            min_tokens=GREEDY_N))
    return dict(zip(PROMPTS, outs))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_matches_hf_and_offline_engine(client, tokenizer, hf_model, offline_greedy,
                                              start_blocks, name):
    """Greedy tokens over gRPC (prefill on P, KV handed to D, decode on D) equal HF
    transformers' and the offline engine's, usage counts them, and the streamed text
    pieces concatenate to the decoded tokens."""
    n = GREEDY_N
    ids = prompt_ids(tokenizer, PROMPTS[name])
    if name == "long":
        assert len(ids) > 16 and len(ids) > PREFILL_BUDGET  # crosses blocks and chunks
    out = collect(client.stream(PROMPTS[name], max_tokens=n, min_tokens=n, temperature=0))

    assert out["token_ids"] == hf_greedy(hf_model, ids, n)
    offline = offline_greedy[name]
    assert out["token_ids"] == offline.token_ids
    assert out["text"] == offline.text
    assert out["finish_reason"] == "length"
    assert out["usage"].prompt_tokens == len(ids)
    assert out["usage"].completion_tokens == n
    assert out["responses"] >= 2  # the first token (from P) arrives before the rest
    assert out["text"] == tokenizer.decode(out["token_ids"])
    assert_blocks_back(client, start_blocks)


def test_prompt_token_ids_input(client, tokenizer, hf_model):
    ids = tokenizer.encode("List three primary colors:")
    out = client.generate(ids, max_tokens=8, min_tokens=8, temperature=0)
    assert out["token_ids"] == hf_greedy(hf_model, ids, 8)
    assert out["usage"].prompt_tokens == len(ids)


def test_seeded_sampling_matches_offline_engine(client, tokenizer, llm):
    """The first token is sampled on P and the rest on D, each keyed by (seed, position):
    the result equals the offline engine's run of the same seed (a different block size
    and batch there)."""
    params = {"temperature": 0.9, "top_k": 50, "top_p": 0.9, "max_tokens": 12,
              "ignore_eos": True}
    seeds = (7, 1234, 2**40 + 3)
    want = llm.generate([tokenizer.encode(LONG_TEXT)] * len(seeds),
                        [SamplingParams(seed=seed, **params) for seed in seeds])
    for seed, offline in zip(seeds, want):
        got = client.generate(LONG_TEXT, seed=seed, **params)
        assert got["token_ids"] == offline.token_ids, seed
    assert len({tuple(o.token_ids) for o in want}) > 1  # the seeds really sample


def test_prefix_cache_hit_reported_in_usage(client, tokenizer, hf_model, start_blocks):
    prompt = "Answer in one word. " * 10 + "What colour is the sky on a clear day?"
    ids = tokenizer.encode(prompt)
    assert len(ids) >= 48
    first = client.generate(prompt, max_tokens=6, min_tokens=6, temperature=0)
    second = client.generate(prompt, max_tokens=6, min_tokens=6, temperature=0)
    # Only full blocks are cached and the last prompt token is always recomputed.
    assert second["usage"].cached_tokens == (len(ids) - 1) // 16 * 16
    assert second["usage"].prompt_tokens == first["usage"].prompt_tokens == len(ids)
    assert second["token_ids"] == first["token_ids"] == hf_greedy(hf_model, ids, 6)
    assert_blocks_back(client, start_blocks)


# ---- cancellation --------------------------------------------------------------------------


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_cancel_mid_prefill_frees_blocks_everywhere(client, start_blocks):
    """A client that cancels while its long prompt is being prefilled (chunk by chunk)
    stops the prefill and frees both the prefill blocks and the decode reservation."""
    n_prompt = MAX_MODEL_LEN - 32
    ids = [(i * 7919) % 40000 + 100 for i in range(n_prompt)]
    before = worker_stats(client)
    base_prompt = before["prefill-0"].prompt_tokens_processed
    base_generated = before["decode-0"].generated_tokens
    aborted = client.stats().requests_aborted

    call = client.generation.Generate(client.request(ids, max_tokens=8, temperature=0),
                                      timeout=120)

    def prefill_started() -> bool:
        s = worker_stats(client)
        return s["prefill-0"].prompt_tokens_processed > base_prompt and s["decode-0"].waiting

    _wait_for(prefill_started, what="the prefill to start")
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED

    assert_blocks_back(client, start_blocks)
    after = worker_stats(client)
    # The prefill stopped part-way and the decode worker never produced a token.
    assert after["prefill-0"].prompt_tokens_processed - base_prompt < n_prompt
    assert after["decode-0"].generated_tokens == base_generated
    assert client.stats().requests_aborted == aborted + 1
    assert_next_request_ok(client)
    assert_blocks_back(client, start_blocks)


def test_cancel_mid_decode_frees_blocks_everywhere(client, start_blocks):
    aborted = client.stats().requests_aborted
    call = client.generation.Generate(
        client.request("Count from one to two hundred:", max_tokens=200, temperature=0,
                       ignore_eos=True), timeout=120)
    got = [next(call), next(call)]
    assert all(r.token_ids for r in got) and not got[-1].finish_reason
    call.cancel()

    assert_blocks_back(client, start_blocks)
    generated = worker_stats(client)["decode-0"].generated_tokens
    time.sleep(0.5)  # decoding really stopped, not just the stream
    assert worker_stats(client)["decode-0"].generated_tokens == generated
    assert client.stats().requests_aborted == aborted + 1
    assert_next_request_ok(client)
    assert_blocks_back(client, start_blocks)


# ---- bad input -----------------------------------------------------------------------------


def _req(prompt="Hello", **sampling) -> pb.GenerateRequest:
    return PdserveClient.request(prompt, **{"max_tokens": 4, **sampling})


def _neither() -> pb.GenerateRequest:
    return pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4))


def _empty_oneof(field: str) -> pb.GenerateRequest:
    req = _neither()
    getattr(req, field).SetInParent()
    return req


def _with_model(name: str) -> pb.GenerateRequest:
    req = _req()
    req.model = name
    return req


BAD_REQUESTS = {
    "empty prompt": (lambda: _req(""), "prompt is empty"),
    "blank prompt": (lambda: _req("   \n\t"), "prompt is empty"),
    "no input": (_neither, "one of prompt, messages or prompt_token_ids is required"),
    "empty messages": (lambda: _empty_oneof("messages"), "messages is empty"),
    "empty token ids": (lambda: _empty_oneof("prompt_token_ids"), "prompt_token_ids is empty"),
    "bad role": (lambda: _req([{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    "token id outside vocab": (lambda: _req([1, 2, 10**6]), "prompt_token_ids"),
    "prompt too long": (lambda: _req("hello " * (MAX_MODEL_LEN + 10)), "context length"),
    "prompt + max_tokens too long": (
        lambda: _req("hello " * (MAX_MODEL_LEN - 100), max_tokens=200), "max_tokens"),
    "max_tokens 0": (lambda: _req(max_tokens=0), "max_tokens must be >= 1"),
    "max_tokens negative": (lambda: _req(max_tokens=-3), "max_tokens must be >= 1"),
    "max_tokens above limit": (lambda: _req(max_tokens=MAX_TOKENS_LIMIT + 1),
                               f"limit of {MAX_TOKENS_LIMIT}"),
    "min_tokens above max_tokens": (lambda: _req(max_tokens=4, min_tokens=5), "min_tokens"),
    "temperature negative": (lambda: _req(temperature=-0.5), "temperature"),
    "top_p above 1": (lambda: _req(top_p=1.5), "top_p"),
    "top_p zero": (lambda: _req(top_p=0.0), "top_p"),
    "top_k below -1": (lambda: _req(top_k=-2), "top_k"),
    "top_k zero": (lambda: _req(top_k=0), "top_k"),
    "min_p above 1": (lambda: _req(min_p=1.5), "min_p"),
    "logprobs too many": (lambda: _req(logprobs=1000), "logprobs"),
    "stop token outside vocab": (lambda: _req(stop_token_ids=[10**6]), "stop_token_ids"),
    "unknown model": (lambda: _with_model("gpt-17"), "model 'gpt-17' is not served"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument(client, start_blocks, case):
    make, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        list(client.generation.Generate(make(), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert_next_request_ok(client)
    assert_blocks_back(client, start_blocks)


UTF8_CASES = {
    "prompt": lambda: _req("PLACEHOLDER"),
    "messages.messages[1].content": lambda: _req(
        [{"role": "user", "content": "hi"}, {"role": "user", "content": "PLACEHOLDER"}]),
    "sampling.stop[0]": lambda: _req(stop=["PLACEHOLDER"]),
}


@pytest.mark.parametrize("field", list(UTF8_CASES))
def test_invalid_utf8_is_invalid_argument(client, start_blocks, field):
    """A `string` field holding invalid UTF-8 cannot come from a protobuf client library,
    so send hand-made bytes: the router answers INVALID_ARGUMENT naming the field."""
    bad = b"bad-\xff\xfe-utf8"
    assert len(bad) == len(b"PLACEHOLDER")  # same length: the length prefixes stay right
    raw = UTF8_CASES[field]().SerializeToString().replace(b"PLACEHOLDER", bad)
    generate_raw = client.channel.unary_stream(
        "/pdserve.v1.Generation/Generate", request_serializer=None,
        response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(generate_raw(raw, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == f"{field} is not valid UTF-8"
    assert_next_request_ok(client)
    assert_blocks_back(client, start_blocks)


# ---- overload --------------------------------------------------------------------------------


def test_queue_full_is_resource_exhausted(client, start_blocks):
    """With max_queue requests in flight the next one is refused at once with
    RESOURCE_EXHAUSTED; the running ones are unaffected; then the queue drains."""
    long_req = client.request("Count from one to two hundred:", max_tokens=200, temperature=0,
                              ignore_eos=True)
    calls = [client.generation.Generate(long_req, timeout=120) for _ in range(MAX_QUEUE)]
    try:
        for call in calls:
            assert next(call).token_ids  # in flight: its first token came back
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(client.generation.Generate(_req(), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in err.value.details()
        assert time.monotonic() - t0 < 5
        assert all(next(call).token_ids for call in calls)  # still streaming
    finally:
        for call in calls:
            call.cancel()
    assert_blocks_back(client, start_blocks)
    assert_next_request_ok(client)
    assert client.stats().queued_requests == 0
