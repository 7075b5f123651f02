"""`pdserve bench` against a real local cluster: the JSON report is complete and every
figure in it can be recomputed from its per-request records."""

from __future__ import annotations

import pytest

from pdserve.bench.cli import main as bench_main
from pdserve.bench.report import load_report, recompute_summaries
from tests.integration.cluster_checks import running_cluster

pytestmark = pytest.mark.slow


def test_short_bench_report_is_complete_and_recomputable(tmp_path, capsys):
    config = {"kv": {"memory_mb": 48}, "prefill": {"threads": 1}, "decode": {"threads": 1}}
    with running_cluster(config) as (bg, _):
        rc = bench_main([
            "--target", bg.address, "--workload", "random", "--num-requests", "6",
            "--input-len", "16:48", "--output-len", "4:8", "--rates", "2,4", "--warmup", "1",
            "--seed", "3", "--slo", "ttft=30s,tpot=5s", "--out-dir", str(tmp_path),
            "--no-progress",
        ])
    out = capsys.readouterr().out
    assert rc == 0, out
    reports = list(tmp_path.glob("*.json"))
    assert len(reports) == 1
    doc = load_report(reports[0])
    assert len(doc["runs"]) == 2
    for run in doc["runs"]:
        records = run["records"]
        assert len(records) == 6 == run["planned"]
        for r in records:
            assert r.error is None and r.finish_reason == "length"
            # Output lengths are forced, so the stream carried exactly what was asked for.
            assert r.completion_tokens == r.output_len
            assert r.first_token_time is not None and r.end_time >= r.first_token_time
        assert run["summary"]["completed"] == 6
    assert recompute_summaries(doc) == [run["summary"] for run in doc["runs"]]
    assert doc["sweep"]["goodput_rate"] == 4  # generous SLOs: both rates attain them
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
    assert (tmp_path / "latency_vs_rate.png").stat().st_size > 0
