"""Router metrics from synthetic chunk timelines and worker stats: exact counts and sums,
parsed back with prometheus-client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine.sampling_params import SamplingParams
from pdserve.messages import StorePoolStats, WorkerStats
from pdserve.router.frontdoor import Admitted, ChunkFields, Refusal
from pdserve.router.lifecycle import RouterCounters
from pdserve.router.metrics import RouterMetrics, buckets_1_2_5


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chunk(n: int, finished: bool = False, **usage) -> ChunkFields:
    return ChunkFields(token_ids=list(range(n)), text="x" * n, logprobs=[], finished=finished,
                       finish_reason="length" if finished else "",
                       prompt_tokens=usage.get("prompt", 0),
                       completion_tokens=usage.get("completion", 0),
                       cached_tokens=usage.get("cached", 0))


def samples(m: RouterMetrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


@pytest.fixture
def setup():
    clock, counters = Clock(), RouterCounters()
    return RouterMetrics("m", 2048, counters, clock=clock), clock, counters


def admitted(n_prompt: int, max_tokens: int = 16) -> Admitted:
    return Admitted("r", list(range(n_prompt)), SamplingParams(max_tokens=max_tokens))


def test_one_request_timeline(setup):
    m, clock, _ = setup
    w = m.watch(admitted(10))
    clock.now += 0.5
    w.on_chunk(chunk(2))  # first chunk: 2 tokens at TTFT 0.5
    clock.now += 0.3
    w.on_chunk(chunk(3))  # 3 tokens 0.3 s later: 3 gaps of 0.1
    clock.now += 0.2
    w.on_chunk(chunk(1, finished=True, prompt=10, completion=6, cached=4))
    w.close(failed=False)
    s = samples(m)
    assert s[("pdserve:time_to_first_token_seconds_count", ())] == 1
    assert s[("pdserve:time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    # One ITL sample per token after the first: 1 (same chunk as first) + 3 + 1.
    assert s[("pdserve:inter_token_latency_seconds_count", ())] == 5
    assert s[("pdserve:inter_token_latency_seconds_sum", ())] == pytest.approx(0.0 + 0.3 + 0.2)
    assert s[("pdserve:request_time_per_output_token_seconds_sum", ())] == pytest.approx(0.1)
    assert s[("pdserve:e2e_request_latency_seconds_sum", ())] == pytest.approx(1.0)
    assert s[("pdserve:request_decode_time_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("pdserve:generation_tokens_total", ())] == 6
    assert s[("pdserve:prompt_tokens_total", ())] == 10
    assert s[("pdserve:prefix_cache_queries_total", ())] == 10
    assert s[("pdserve:prefix_cache_hits_total", ())] == 4
    assert s[("pdserve:request_success_total", (("finished_reason", "length"),))] == 1
    assert s[("pdserve:request_params_max_tokens_sum", ())] == 16


def test_unfinished_requests_are_aborts_or_errors(setup):
    m, clock, _ = setup
    w = m.watch(admitted(5))
    w.on_chunk(chunk(1))
    w.close(failed=False)  # client went away
    m.watch(admitted(5)).close(failed=True)  # a handoff failed before any token
    m.on_rejected(Refusal.QUEUE_FULL)
    s = samples(m)
    assert s[("pdserve:request_success_total", (("finished_reason", "abort"),))] == 1
    assert s[("pdserve:request_success_total", (("finished_reason", "error"),))] == 1
    assert s[("pdserve:e2e_request_latency_seconds_count", ())] == 0
    assert s[("pdserve:request_rejections_total", (("reason", "queue_full"),))] == 1
    assert s[("pdserve:request_rejections_total", (("reason", "decode_full"),))] == 0


def test_worker_figures_come_from_the_latest_poll(setup):
    m, _, counters = setup
    counters.in_flight, counters.handoff_retries = 3, 2
    counters.migrations, counters.workers_replaced = 4, 1
    m.observe_worker_stats([
        WorkerStats.from_dict(
            {"worker_id": "prefill-0", "role": "prefill", "free_blocks": 30, "total_blocks": 40,
             "running": 1, "waiting": 2, "prompt_tokens": 500, "generated_tokens": 5,
             "handoffs": 4, "handoff_seconds": 0.2, "handoff_bytes": 1000,
             "handoff_tail_seconds": 0.05, "leases_expired": 0, "node": "",
             "store_lookups": 3, "store_hit_blocks": 2, "store_hit_tokens": 32,
             "store_saved_blocks": 7, "store_loaded_bytes": 1 << 20, "store_load_seconds": 0.01,
             "preemptions": 0, "preempted_tokens": 0, "store_pulled_blocks": 0,
             "store_pulled_bytes": 0, "store_pull_seconds": 0.0, "store_save_skipped": 5,
             "solo_steps": 0, "tp": 2, "pp": 1,
             "rank_failure": ""}),
        WorkerStats.from_dict(
            {"worker_id": "decode-0", "role": "decode", "free_blocks": 10, "total_blocks": 40,
             "running": 3, "waiting": 0, "prompt_tokens": 0, "generated_tokens": 90,
             "handoffs": 0, "handoff_seconds": 0.0, "handoff_bytes": 0,
             "handoff_tail_seconds": 0.0, "leases_expired": 1, "node": "",
             "store_lookups": 0, "store_hit_blocks": 0, "store_hit_tokens": 0,
             "store_saved_blocks": 0, "store_loaded_bytes": 0, "store_load_seconds": 0.0,
             "preemptions": 2, "preempted_tokens": 300, "store_pulled_blocks": 3,
             "store_pulled_bytes": 3 << 20, "store_pull_seconds": 0.25, "store_save_skipped": 0,
             "solo_steps": 6, "tp": 1, "pp": 1,
             "rank_failure": ""}),
    ])
    s = samples(m)
    p = (("role", "prefill"), ("worker", "prefill-0"))
    d = (("role", "decode"), ("worker", "decode-0"))
    assert s[("pdserve:kv_cache_usage_perc", p)] == 0.25
    assert s[("pdserve:kv_cache_usage_perc", d)] == 0.75
    assert s[("pdserve:kv_cache_free_blocks", d)] == 10
    assert s[("pdserve:num_requests_running", d)] == 3
    assert s[("pdserve:num_requests_waiting", p)] == 2
    assert s[("pdserve:kv_handoffs_total", p)] == 4
    assert s[("pdserve:kv_handoff_bytes_total", p)] == 1000
    assert s[("pdserve:kv_handoff_seconds_count", p)] == 4
    assert s[("pdserve:kv_handoff_seconds_sum", p)] == pytest.approx(0.2)
    assert s[("pdserve:kv_leases_expired_total", d)] == 1
    assert s[("pdserve:worker_preemptions_total", d)] == 2
    assert s[("pdserve:worker_preempted_tokens_total", d)] == 300
    assert s[("pdserve:worker_solo_prefill_steps_total", d)] == 6
    assert s[("pdserve:worker_solo_prefill_steps_total", p)] == 0
    assert s[("pdserve:worker_generation_tokens_total", d)] == 90
    assert s[("pdserve:kv_store_hit_tokens_total", p)] == 32
    assert s[("pdserve:kv_store_saved_blocks_total", p)] == 7
    assert s[("pdserve:kv_store_save_skipped_total", p)] == 5
    assert s[("pdserve:kv_store_save_skipped_total", d)] == 0
    assert s[("pdserve:kv_store_loaded_bytes_total", p)] == 1 << 20
    assert s[("pdserve:kv_store_load_seconds_total", p)] == pytest.approx(0.01)
    assert s[("pdserve:kv_store_pulled_blocks_total", d)] == 3
    assert s[("pdserve:kv_store_pulled_bytes_total", d)] == 3 << 20
    assert s[("pdserve:kv_store_pull_seconds_total", d)] == pytest.approx(0.25)
    assert s[("pdserve:kv_handoff_retries_total", ())] == 2
    assert s[("pdserve:request_migrations_total", ())] == 4
    assert s[("pdserve:workers_replaced_total", ())] == 1
    assert s[("pdserve:router_requests_in_flight", ())] == 3
    assert 0 <= s[("pdserve:worker_stats_age_seconds", ())] < 5


def test_store_pools_are_gauges_per_node_and_unknown_figures_are_left_out(setup):
    m, _, _ = setup
    m.observe_store_pools([
        StorePoolStats("n1", "/dev/shm/p", "cpu", True, 4096, 512, 100, 2, 7, 300),
        StorePoolStats("n2", "/dev/shm/q"),  # Redis did not answer: nothing known
    ])
    s = samples(m)
    n1 = (("node", "n1"), ("tier", "cpu"))
    assert s[("pdserve:kv_store_capacity_blocks", n1)] == 512
    assert s[("pdserve:kv_store_used_blocks", n1)] == 100
    assert s[("pdserve:kv_store_pinned_blocks", n1)] == 2
    assert s[("pdserve:kv_store_evictions_total", n1)] == 7
    assert s[("pdserve:kv_store_puts_total", n1)] == 300
    assert not any(labels and labels[0] == ("node", "n2") for _, labels in s)


def test_token_buckets_follow_vllm():
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(4) == (1, 2)


def test_routers_in_one_process_do_not_share_metrics():
    a = RouterMetrics("m", 64, RouterCounters())
    b = RouterMetrics("m", 64, RouterCounters())
    a.watch(admitted(3)).close(failed=True)
    assert samples(a)[("pdserve:request_success_total", (("finished_reason", "error"),))] == 1
    assert samples(b)[("pdserve:request_success_total", (("finished_reason", "error"),))] == 0
