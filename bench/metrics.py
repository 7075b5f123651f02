"""Benchmark figures computed from request records.

Definitions (all per request, from the client's own clock):

- **TTFT**: first token's arrival minus send time.
- **TPOT**: ``(end - first token) / (n - 1)`` over the ``n`` streamed tokens, i.e. the mean
  time per output token *after* the first. It is undefined for a one-token stream; such
  requests are left out of TPOT statistics (``tpot_excluded_single_token`` counts them) and
  meet any TPOT bound vacuously.
- **ITL**: the gap between consecutive token-carrying chunks. A chunk carrying ``k`` tokens
  contributes ``k`` values of ``gap / k``, so ITLs are per token and a request's ITLs sum to
  its last chunk time minus its first token time. Tokens that came with the first chunk
  belong to TTFT, not ITL.
- **E2E**: end of stream minus send time.

Only completed requests (``RequestRecord.ok``) enter latency statistics and throughput;
failed (an error) and aborted (``finish_reason == "abort"``) requests are counted apart and
count as SLO misses. Throughput is over the measured window: the first send to the last end
of any measured request (warm-up requests are never passed in here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pdserve.bench.records import RequestRecord
from pdserve.bench.slo import SLO

PERCENTILES = (50, 90, 99)


def ttft(record: RequestRecord) -> float | None:
    """Time to first token in seconds, or None when no token arrived."""
    if record.first_token_time is None:
        return None
    return record.first_token_time - record.send_time


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first, in seconds; None for fewer than 2 tokens."""
    n = record.streamed_tokens
    if n < 2 or record.first_token_time is None or record.end_time is None:
        return None
    return (record.end_time - record.first_token_time) / (n - 1)


def e2e(record: RequestRecord) -> float | None:
    """End-to-end latency in seconds, or None when the stream never ended."""
    if record.end_time is None:
        return None
    return record.end_time - record.send_time


def itls(record: RequestRecord) -> list[float]:
    """Per-token inter-token latencies in seconds (see the module docstring)."""
    gaps: list[float] = []
    previous: float | None = None
    for when, count in zip(record.chunk_times, record.chunk_tokens, strict=True):
        if count <= 0:
            continue  # a final chunk with only the finish reason adds no token
        if previous is not None:
            gaps.extend([(when - previous) / count] * count)
        previous = when
    return gaps


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """True when the request completed and met every bound in ``slo``."""
    if not record.ok:
        return False
    checks = ((slo.ttft_s, ttft(record)), (slo.tpot_s, tpot(record)), (slo.e2e_s, e2e(record)))
    # A None value can only be TPOT of a one-token stream here: no per-token phase to judge.
    return all(bound is None or value is None or value <= bound for bound, value in checks)


def latency_stats(values_s: Sequence[float]) -> dict[str, Any]:
    """count, mean and percentiles of latencies given in seconds, reported in milliseconds.

    Percentiles use linear interpolation between order statistics (numpy's default). With no
    values every figure is None rather than NaN, so the JSON stays standard.
    """
    stats: dict[str, Any] = {"count": len(values_s)}
    if not values_s:
        stats.update({"mean": None, **{f"p{p}": None for p in PERCENTILES}})
        return stats
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats["mean"] = float(ms.mean())
    for p in PERCENTILES:
        stats[f"p{p}"] = float(np.percentile(ms, p))
    return stats


def measured_window(records: Iterable[RequestRecord]) -> float:
    """Seconds from the first send to the last end among ``records`` (0 if none ended)."""
    sends = [r.send_time for r in records if r.end_time is not None]
    ends = [r.end_time for r in records if r.end_time is not None]
    if not sends:
        return 0.0
    return max(ends) - min(sends)


def _per_second(amount: float, window: float) -> float | None:
    return amount / window if window > 0 else None


def summarize(records: Sequence[RequestRecord], slo: SLO) -> dict[str, Any]:
    """All benchmark figures for one run, as a JSON-ready dict (latencies in ms).

    Input tokens are the server's ``prompt_tokens`` (the true count after its tokenization),
    falling back to the requested length where no usage came back. Output tokens are the
    streamed tokens, the ones the timings describe; ``token_count_mismatches`` counts
    completed requests whose ``Usage.completion_tokens`` disagrees with that.
    """
    done = [r for r in records if r.ok]
    aborted = sum(1 for r in records if r.error is None and r.finish_reason == "abort")
    window = measured_window(records)
    input_tokens = sum(r.prompt_tokens or r.input_len for r in done)
    output_tokens = sum(r.streamed_tokens for r in done)
    cached = sum(r.cached_tokens for r in done)
    tpots = [t for t in (tpot(r) for r in done) if t is not None]
    met = sum(1 for r in records if meets_slo(r, slo))
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done) - aborted,
        "aborted": aborted,
        "duration_s": window,
        "request_throughput": _per_second(len(done), window),
        "input_token_throughput": _per_second(input_tokens, window),
        "output_token_throughput": _per_second(output_tokens, window),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "cached_tokens": cached,
        "cached_fraction": cached / input_tokens if input_tokens else None,
        "token_count_mismatches": sum(
            1 for r in done if r.completion_tokens and r.completion_tokens != r.streamed_tokens
        ),
        "ttft_ms": latency_stats([ttft(r) for r in done]),
        "tpot_ms": latency_stats(tpots),
        "tpot_excluded_single_token": len(done) - len(tpots),
        "itl_ms": latency_stats([gap for r in done for gap in itls(r)]),
        "e2e_ms": latency_stats([e2e(r) for r in done]),
        "slo": str(slo),
        "slo_met": met,
        "slo_attainment_pct": 100.0 * met / len(records) if records else None,
        "goodput": _per_second(met, window),
    }
