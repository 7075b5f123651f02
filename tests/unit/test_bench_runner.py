"""The async client and runner against an in-test gRPC server with known pacing."""

from __future__ import annotations

import asyncio
import time

import pytest
from testkit import free_port

from pdserve.bench.arrival import Arrival
from pdserve.bench.client import GenerationClient, ServerUnreachable, build_request
from pdserve.bench.fake_server import Pace, start
from pdserve.bench.metrics import itls, summarize, tpot, ttft
from pdserve.bench.runner import RunSettings, benchmark, run_load
from pdserve.bench.slo import SLO
from pdserve.bench.workloads import RequestSpec, random_workload


def specs(n: int, output_len: int) -> list[RequestSpec]:
    return [RequestSpec(output_len, 4, prompt_token_ids=(1, 2, 3, 4)) for _ in range(n)]


async def run_against(pace: Pace, requests, arrival, **kwargs):
    server, port = await start(pace)
    client = GenerationClient(f"127.0.0.1:{port}", request_timeout=kwargs.pop("timeout", 10.0))
    try:
        await client.connect(5.0)
        return await run_load(client, requests, arrival, seed=0, progress=False, **kwargs)
    finally:
        await client.close()
        await server.stop(None)


def test_recorded_ttft_and_itl_reflect_the_server_pacing():
    pace = Pace(ttft=0.08, itl=0.03)
    result = asyncio.run(run_against(pace, specs(3, 5), Arrival()))
    assert len(result.records) == 3
    for record in result.records:
        assert record.ok and record.streamed_tokens == 5 and record.finish_reason == "length"
        assert record.prompt_tokens == 4 and record.completion_tokens == 5
        assert 0.075 <= ttft(record) < 0.08 + 0.15
        gaps = itls(record)
        # One late arrival shortens the next gap on a loaded machine, so bound each gap
        # loosely and their sum (the server's cumulative sleeps) tightly.
        assert len(gaps) == 4 and all(0 < g < 0.03 + 0.1 for g in gaps)
        assert sum(gaps) >= 4 * 0.03 - 0.005
        assert (4 * 0.03 - 0.005) / 4 <= tpot(record) < 0.13


def test_multi_token_chunks_split_into_per_token_itls():
    pace = Pace(ttft=0.02, itl=0.02, chunk=3)  # chunks of 1, 3, 3 tokens
    record = asyncio.run(run_against(pace, specs(1, 7), Arrival())).records[0]
    assert [n for n in record.chunk_tokens if n] == [1, 3, 3]
    gaps = itls(record)
    # Each 3-token chunk arrives ~0.06 s after the previous: three ITLs of ~0.02 s, not one.
    assert len(gaps) == 6 and all(0.018 <= g < 0.02 + 0.04 for g in gaps)


def test_failures_and_timeouts_are_recorded_not_raised():
    failing = asyncio.run(
        run_against(Pace(ttft=0.01, itl=0.01, fail_every=2), specs(4, 3), Arrival(concurrency=1))
    )
    errors = [r.error for r in failing.records]
    assert sum(e is not None and e.startswith("INTERNAL") for e in errors) == 2
    assert summarize(failing.records, SLO())["failed"] == 2
    slow = asyncio.run(run_against(Pace(ttft=1.0), specs(1, 3), Arrival(), timeout=0.2))
    assert slow.records[0].error.startswith("DEADLINE_EXCEEDED")
    assert slow.records[0].end_time - slow.records[0].send_time < 0.9


def test_concurrency_one_never_overlaps_requests():
    result = asyncio.run(
        run_against(Pace(ttft=0.01, itl=0.005), specs(4, 3), Arrival(concurrency=1))
    )
    ordered = sorted(result.records, key=lambda r: r.send_time)
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert after.send_time >= before.end_time


def test_poisson_pacing_and_time_limit():
    arrival = Arrival(rate=20.0)
    started = time.perf_counter()
    result = asyncio.run(
        run_against(Pace(ttft=0.005, itl=0.001), specs(200, 2), arrival, time_limit=0.5)
    )
    assert result.stopped_by_time_limit and result.planned == 200
    assert 3 <= len(result.records) < 30  # ~10 expected at 20/s for 0.5 s
    assert time.perf_counter() - started < 3.0
    # Each send is scheduled at start + offset. A busy CI host can stall the event loop for
    # a tenth of a second and make any one send late, so compare the lateness against the
    # least-late send: most sends must be on time (a runner that sent at once, or slept the
    # gaps and drifted, would be late by the growing offsets instead).
    offsets = arrival.send_offsets(200, seed=0)
    shifts = [r.send_time - o for r, o in zip(result.records, offsets, strict=False)]
    lateness = sorted(shift - min(shifts) for shift in shifts)
    assert lateness[len(lateness) // 2] < 0.03
    assert lateness[-1] < 0.5


def test_benchmark_runs_warmup_and_every_rate():
    async def scenario():
        server, port = await start(Pace(ttft=0.005, itl=0.002))
        try:
            settings = RunSettings(target=f"127.0.0.1:{port}", progress=False)
            requests = random_workload(5, (4, 8), (2, 3), seed=0).requests
            return await benchmark(
                settings, requests, [Arrival(50.0), Arrival(100.0)], warmup=requests[:2]
            )
        finally:
            await server.stop(None)

    health, results = asyncio.run(scenario())
    assert health["mode"] == "fake"
    assert [len(r.records) for r in results] == [5, 5]
    assert len(results[0].warmup_records) == 2 and results[1].warmup_records == []
    ids = [r.request_id for run in results for r in run.records + run.warmup_records]
    assert len(set(ids)) == len(ids)


def test_unreachable_server_raises_a_clear_error():
    async def scenario():
        client = GenerationClient(f"127.0.0.1:{free_port()}")
        try:
            await client.connect(3.0)
        finally:
            await client.close()

    started = time.perf_counter()
    with pytest.raises(ServerUnreachable, match="cannot connect to pdserve at 127.0.0.1:"):
        asyncio.run(scenario())
    assert time.perf_counter() - started < 3.5


def test_request_forces_output_length_unless_told_not_to():
    spec = RequestSpec(9, 2, prompt_token_ids=(5, 6))
    forced = build_request(spec, "id", seed=3)
    assert forced.sampling.min_tokens == forced.sampling.max_tokens == 9
    assert forced.sampling.ignore_eos and forced.sampling.seed == 3
    assert list(forced.prompt_token_ids.ids) == [5, 6]
    free = build_request(spec, "id", force_output_len=False)
    assert not free.sampling.HasField("min_tokens") and not free.sampling.ignore_eos
    chat = build_request(RequestSpec(1, 1, messages=(("user", "hi"),)), "id")
    assert chat.WhichOneof("input") == "messages" and chat.messages.messages[0].content == "hi"
