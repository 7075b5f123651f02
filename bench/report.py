"""The readable table on stdout and the JSON report with every request's record.

The JSON holds the run configuration (including the SLO string), every record, and the
summary figures; ``recompute_summaries`` recomputes the figures from the records, which is
how a reader (or a test) checks that the stored figures are what the records say.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import summarize
from pdserve.bench.records import RequestRecord
from pdserve.bench.runner import RunResult
from pdserve.bench.slo import parse_slo

FORMAT = "pdserve-bench/1"
ATTAINMENT_TARGET_PCT = 90.0  # DistServe's goodput: the highest rate at which >= 90% meet SLOs


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; None (undefined) shows as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def format_summary(summary: dict[str, Any], title: str) -> str:
    """One run's figures as an aligned block of text."""
    s = summary
    lines = [
        f"=== {title} ===",
        f"{'requests':<22}{s['requests']} sent: {s['completed']} completed, "
        f"{s['failed']} failed, {s['aborted']} aborted",
        f"{'measured window':<22}{fmt(s['duration_s'])} s",
        f"{'request throughput':<22}{fmt(s['request_throughput'], 3)} req/s",
        f"{'input throughput':<22}{fmt(s['input_token_throughput'], 1)} tok/s "
        f"({s['total_input_tokens']} tokens, {s['cached_tokens']} cached)",
        f"{'output throughput':<22}{fmt(s['output_token_throughput'], 1)} tok/s "
        f"({s['total_output_tokens']} tokens)",
        f"{'SLO':<22}{s['slo'] or '(none: every completed request counts)'}",
        f"{'SLO attainment':<22}{fmt(s['slo_attainment_pct'], 1)} %",
        f"{'goodput':<22}{fmt(s['goodput'], 3)} req/s",
        f"{'latency (ms)':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'n':>8}",
    ]
    for name, key in (
        ("TTFT", "ttft_ms"),
        ("TPOT", "tpot_ms"),
        ("ITL", "itl_ms"),
        ("E2E", "e2e_ms"),
    ):
        st = s[key]
        cells = "".join(f"{fmt(st[k]):>10}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name:<12}{cells}{st['count']:>8}")
    if s["tpot_excluded_single_token"]:
        lines.append(f"TPOT leaves out {s['tpot_excluded_single_token']} one-token stream(s).")
    if s["token_count_mismatches"]:
        lines.append(
            f"warning: {s['token_count_mismatches']} request(s) streamed a different number of "
            "tokens than their Usage reported"
        )
    return "\n".join(lines)


def goodput_rate(runs: Sequence[tuple[float | None, dict[str, Any]]]) -> float | None:
    """The highest rate whose SLO attainment is >= 90%, or None if none reached it."""
    passing = [
        rate
        for rate, summary in runs
        if rate is not None
        and summary["slo_attainment_pct"] is not None
        and summary["slo_attainment_pct"] >= ATTAINMENT_TARGET_PCT
    ]
    return max(passing) if passing else None


def format_sweep(runs: Sequence[tuple[float | None, dict[str, Any]]]) -> str:
    """The rate sweep as one table, ending with the DistServe goodput line."""
    head = ["rate/s", "done", "req/s", "TTFT p50", "TTFT p90", "TPOT p50", "TPOT p90", "SLO %"]
    head.append("goodput")
    lines = ["=== rate sweep (latencies in ms) ===", "".join(f"{h:>10}" for h in head)]
    for rate, s in runs:
        row = [
            fmt(rate, 2),
            f"{s['completed']}/{s['requests']}",
            fmt(s["request_throughput"], 3),
            fmt(s["ttft_ms"]["p50"]),
            fmt(s["ttft_ms"]["p90"]),
            fmt(s["tpot_ms"]["p50"]),
            fmt(s["tpot_ms"]["p90"]),
            fmt(s["slo_attainment_pct"], 1),
            fmt(s["goodput"], 3),
        ]
        lines.append("".join(f"{cell:>10}" for cell in row))
    best = goodput_rate(runs)
    lines.append(
        f"goodput (highest rate with SLO attainment >= {ATTAINMENT_TARGET_PCT:g}%): "
        + (f"{best:g} req/s" if best is not None else "no tested rate reached it")
    )
    return "\n".join(lines)


def run_to_dict(result: RunResult, summary: dict[str, Any]) -> dict[str, Any]:
    """One run as stored in the JSON report."""
    arrival = result.arrival
    return {
        "label": arrival.label,
        "arrival": {
            "rate": arrival.rate,
            "burstiness": arrival.burstiness,
            "concurrency": arrival.concurrency,
        },
        "planned": result.planned,
        "stopped_by_time_limit": result.stopped_by_time_limit,
        "summary": summary,
        "records": [r.to_dict() for r in result.records],
        "warmup_records": [r.to_dict() for r in result.warmup_records],
    }


def write_report(path: Path, config: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Write the JSON report: ``config`` (must hold ``slo``), and runs from ``run_to_dict``."""
    document: dict[str, Any] = {"format": FORMAT, "config": config, "runs": runs}
    if len(runs) > 1:
        rated = [(run["arrival"]["rate"], run["summary"]) for run in runs]
        document["sweep"] = {
            "attainment_target_pct": ATTAINMENT_TARGET_PCT,
            "goodput_rate": goodput_rate(rated),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: an undefined figure must be null, never a non-standard NaN.
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def load_report(path: Path) -> dict[str, Any]:
    """Read a JSON report back, turning each run's records into RequestRecords."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} report")
    for run in document["runs"]:
        run["records"] = [RequestRecord.from_dict(r) for r in run["records"]]
        run["warmup_records"] = [RequestRecord.from_dict(r) for r in run["warmup_records"]]
    return document


def recompute_summaries(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run's summary recomputed from its records and the stored SLO string."""
    slo = parse_slo(document["config"]["slo"])
    return [summarize(run["records"], slo) for run in document["runs"]]
