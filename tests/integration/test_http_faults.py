# ruff: noqa: F811 (pytest fixtures imported from http_checks are parameters here)
"""Faults, limits and accounting of the OpenAI-compatible HTTP API on one real 1P1D cluster
(local Ray, SmolLM2 on CPU, KV over loopback gRPC): a failed handoff, a full queue, clients
that disconnect (free blocks back on every worker), /metrics after a known set of requests,
and `pdserve bench --backend openai` against the gRPC backend."""

from __future__ import annotations

import json
import time

import pytest
from cluster_checks import assert_blocks_back, worker_stats
from http_checks import (  # the module fixtures every HTTP test module uses:
    CHAT,
    MODEL,
    PROMPT,
    TOKEN,
    Http,
    delta,
    grpc_client,  # noqa: F401
    http,  # noqa: F401
    http_cluster,
    oai,  # noqa: F401
    read_event,
    sample,
    start_blocks,  # noqa: F401
    tokenizer,  # noqa: F401
    wait_for,
)

from pdserve.bench.cli import main as bench_main
from pdserve.bench.report import load_report

pytestmark = pytest.mark.slow

MAX_QUEUE = 2
ROUTER = {"max_queue": MAX_QUEUE, "handoff_retries": 0}
# The first handoff fails: the fixture's first request shows what a failed handoff is.
DEBUG = {"inject_transfer_failures": 1}


@pytest.fixture(scope="module")
def served():
    with http_cluster(ROUTER, DEBUG) as (bg, grpc_client, http):
        failed = http.request("POST", "/v1/completions",
                              {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        yield bg, grpc_client, http, failed


def test_failed_handoff_is_503_in_openai_shape(served, grpc_client, start_blocks):
    status, body, _ = served[3]
    assert status == 503, body
    assert body["error"]["type"] == "service_unavailable"
    assert "injected transfer failure" in body["error"]["message"]
    assert_blocks_back(grpc_client, start_blocks)


def _long_stream(http: Http, **extra):
    return http.open_stream("/v1/completions", {
        "model": MODEL, "prompt": "Count from one to two hundred:", "max_tokens": 120,
        "temperature": 0, "ignore_eos": True, "stream": True, **extra})


def test_queue_full_is_429(http, grpc_client, start_blocks):
    streams = [_long_stream(http) for _ in range(MAX_QUEUE)]
    try:
        for _, resp in streams:
            assert resp.status == 200 and read_event(resp)  # in flight
        status, err, _ = http.request("POST", "/v1/completions",
                                      {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
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
