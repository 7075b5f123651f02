"""The JSON report: written, reloaded, and every figure recomputable from the records."""

from __future__ import annotations

import json

from pdserve.bench.arrival import Arrival
from pdserve.bench.metrics import summarize
from pdserve.bench.records import RequestRecord
from pdserve.bench.report import (
    format_summary,
    format_sweep,
    goodput_rate,
    load_report,
    recompute_summaries,
    run_to_dict,
    write_report,
)
from pdserve.bench.runner import RunResult
from pdserve.bench.slo import parse_slo


def records(shift: float, n: int = 6) -> list[RequestRecord]:
    out = []
    for i in range(n):
        r = RequestRecord(f"r{i}", input_len=20, output_len=3, send_time=shift + i * 0.1)
        for k in range(3 if i else 1):  # request 0 streams a single token
            r.add_chunk(r.send_time + 0.05 * (i + 1) + 0.013 * k, 1)
        r.end_time = r.chunk_times[-1]
        r.prompt_tokens, r.completion_tokens, r.finish_reason = 20, len(r.chunk_times), "length"
        out.append(r)
    out[-1].error = "DEADLINE_EXCEEDED: Deadline Exceeded"
    return out


def test_report_round_trip_recomputes_the_stored_summary(tmp_path):
    slo = parse_slo("ttft=180ms,tpot=20ms")
    runs = []
    for rate, shift in ((1.0, 10.0), (2.0, 30.0)):
        result = RunResult(Arrival(rate), records(shift), planned=6)
        result.warmup_records = records(0.0, 2)
        runs.append(run_to_dict(result, summarize(result.records, slo)))
    path = tmp_path / "out" / "report.json"
    write_report(path, {"slo": str(slo), "seed": 0}, runs)
    document = load_report(path)
    assert all(isinstance(r, RequestRecord) for r in document["runs"][0]["records"])
    stored = [run["summary"] for run in document["runs"]]
    assert recompute_summaries(document) == stored
    assert stored[0]["failed"] == 1 and stored[0]["tpot_excluded_single_token"] == 1
    assert document["runs"][0]["warmup_records"][0].request_id == "r0"
    assert document["sweep"]["goodput_rate"] == goodput_rate([(1.0, stored[0]), (2.0, stored[1])])


def test_undefined_figures_are_json_null(tmp_path):
    failed = records(0.0, 1)
    failed[0].error = "UNAVAILABLE: down"
    path = tmp_path / "r.json"
    summary = summarize(failed, parse_slo(""))
    write_report(path, {"slo": ""}, [run_to_dict(RunResult(Arrival(), failed, 1), summary)])
    stored = json.loads(path.read_text())["runs"][0]["summary"]
    assert stored["ttft_ms"]["p50"] is None and "sweep" not in json.loads(path.read_text())


def fake_summary(attainment):
    stats = {"count": 1, "mean": 1.0, "p50": 1.0, "p90": 2.0, "p99": 3.0}
    return {
        "requests": 10,
        "completed": 10,
        "failed": 0,
        "aborted": 0,
        "duration_s": 1.0,
        "request_throughput": 10.0,
        "input_token_throughput": 1.0,
        "output_token_throughput": 1.0,
        "total_input_tokens": 1,
        "total_output_tokens": 1,
        "cached_tokens": 0,
        "token_count_mismatches": 0,
        "ttft_ms": stats,
        "tpot_ms": stats,
        "itl_ms": stats,
        "e2e_ms": stats,
        "tpot_excluded_single_token": 0,
        "slo": "ttft=1s",
        "slo_met": 0,
        "slo_attainment_pct": attainment,
        "goodput": 1.0,
    }


def test_goodput_rate_is_highest_rate_with_90_percent():
    runs = [(1.0, fake_summary(99.0)), (2.0, fake_summary(90.0)), (4.0, fake_summary(89.9))]
    assert goodput_rate(runs) == 2.0
    assert goodput_rate([(1.0, fake_summary(10.0))]) is None
    assert "attainment >= 90%): 2 req/s" in format_sweep(runs)


def test_summary_table_names_the_figures():
    text = format_summary(fake_summary(95.0), "title")
    for word in ("TTFT", "TPOT", "ITL", "E2E", "goodput", "SLO attainment", "95.0 %"):
        assert word in text
