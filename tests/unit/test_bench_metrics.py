"""Every benchmark figure on hand-made timing records with known answers."""

from __future__ import annotations

import pytest

from pdserve.bench.metrics import e2e, itls, latency_stats, meets_slo, summarize, tpot, ttft
from pdserve.bench.records import RequestRecord
from pdserve.bench.slo import SLO, parse_slo


def make(rid, send, chunks, end, *, prompt=0, completion=0, finish="length", error=None, inp=7):
    """A record sent at ``send`` whose chunks are (time, tokens) pairs."""
    record = RequestRecord(rid, input_len=inp, output_len=8, send_time=send)
    for when, count in chunks:
        record.add_chunk(when, count)
    record.end_time = end
    record.prompt_tokens, record.completion_tokens = prompt, completion
    record.finish_reason, record.error = finish, error
    return record


@pytest.fixture
def records():
    # A: 4 tokens, the last chunk carries 2 of them.
    a = make("a", 0.0, [(0.1, 1), (0.15, 1), (0.35, 2)], 0.4, prompt=10, completion=4)
    # B: a one-token stream, then a final chunk with only the finish reason.
    b = make("b", 1.0, [(1.2, 1), (1.25, 0)], 1.25, completion=2)
    # C: failed after a token; D: aborted by the server. Both end inside the window.
    c = make("c", 0.5, [(0.6, 1)], 0.7, error="UNAVAILABLE: worker died")
    d = make("d", 1.5, [(1.6, 1)], 2.0, finish="abort")
    return [a, b, c, d]


def test_per_request_figures(records):
    a, b, c, _ = records
    assert ttft(a) == pytest.approx(0.1)
    assert tpot(a) == pytest.approx((0.4 - 0.1) / 3)  # first token excluded
    assert e2e(a) == pytest.approx(0.4)
    # The 2-token chunk's 0.2 s gap counts as two ITLs of 0.1 s.
    assert itls(a) == pytest.approx([0.05, 0.1, 0.1])
    assert sum(itls(a)) == pytest.approx(0.35 - 0.1)
    assert ttft(b) == pytest.approx(0.2)
    assert tpot(b) is None and itls(b) == []
    assert a.ok and b.ok and not c.ok and not records[3].ok


def test_record_without_token_is_not_ok():
    record = make("x", 0.0, [(0.1, 0)], 0.1)
    assert ttft(record) is None and not record.ok


def test_summary_counts_throughput_and_latencies(records):
    s = summarize(records, SLO())
    assert (s["requests"], s["completed"], s["failed"], s["aborted"]) == (4, 2, 1, 1)
    assert s["duration_s"] == pytest.approx(2.0)  # first send 0.0 to last end 2.0 (the abort)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["total_input_tokens"] == 10 + 7  # B had no usage: falls back to input_len
    assert s["total_output_tokens"] == 5  # streamed tokens of completed requests only
    assert s["output_token_throughput"] == pytest.approx(2.5)
    assert s["input_token_throughput"] == pytest.approx(8.5)
    assert s["ttft_ms"] == pytest.approx(
        {"count": 2, "mean": 150.0, "p50": 150.0, "p90": 190.0, "p99": 199.0}
    )
    assert s["tpot_ms"]["count"] == 1 and s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["tpot_excluded_single_token"] == 1
    assert s["itl_ms"]["count"] == 3 and s["itl_ms"]["mean"] == pytest.approx(250 / 3)
    assert s["e2e_ms"]["mean"] == pytest.approx(325.0)
    assert s["token_count_mismatches"] == 1  # B reported 2 tokens but streamed 1


def test_no_slo_means_every_completed_request_counts(records):
    s = summarize(records, SLO())
    assert s["slo_met"] == 2
    assert s["slo_attainment_pct"] == pytest.approx(50.0)  # failures are misses
    assert s["goodput"] == pytest.approx(1.0)


def test_goodput_and_attainment_under_ttft_slo(records):
    s = summarize(records, parse_slo("ttft=150ms"))
    assert s["slo_met"] == 1  # A (100 ms) meets, B (200 ms) misses, C and D never count
    assert s["slo_attainment_pct"] == pytest.approx(25.0)
    assert s["goodput"] == pytest.approx(0.5)


def test_tpot_slo_is_vacuous_for_one_token_streams(records):
    a, b, c, _ = records
    slo = parse_slo("tpot=50ms")
    assert not meets_slo(a, slo)  # 100 ms per token
    assert meets_slo(b, slo)
    assert not meets_slo(c, SLO())  # a failed request misses even an empty SLO


def test_every_bound_must_hold(records):
    a = records[0]
    assert meets_slo(a, parse_slo("ttft=101ms,tpot=101ms,e2e=401ms"))
    assert not meets_slo(a, parse_slo("ttft=101ms,tpot=101ms,e2e=399ms"))


def test_empty_stats_are_none_not_nan():
    assert latency_stats([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    s = summarize([], SLO())
    assert s["request_throughput"] is None and s["slo_attainment_pct"] is None


def test_record_json_round_trip(records):
    for record in records:
        assert RequestRecord.from_dict(record.to_dict()) == record
    with pytest.raises(ValueError, match="unknown"):
        RequestRecord.from_dict({**records[0].to_dict(), "surprise": 1})
