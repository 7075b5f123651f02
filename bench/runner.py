"""The asyncio load generator: warm-up, then the workload under an arrival process.

A run stops *issuing* requests when either every request was sent or the time limit passed;
requests already in flight are then awaited (each is bounded by the per-request timeout),
so the time limit never turns a slow request into a fake failure.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from pdserve.bench.arrival import Arrival
from pdserve.bench.client import GenerationClient
from pdserve.bench.records import RequestRecord
from pdserve.bench.workloads import RequestSpec

if TYPE_CHECKING:
    from pdserve.bench.openai_client import OpenAIClient


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything about how requests are sent that is not the workload or the arrivals."""

    target: str = "127.0.0.1:50051"
    seed: int = 0
    time_limit: float | None = None  # seconds; None = until every request was sent
    request_timeout: float = 300.0
    connect_timeout: float = 5.0
    force_output_len: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    ca_file: str | None = None  # TLS: verify the server against this CA certificate (PEM)
    progress: bool = True
    backend: str = "pdserve"  # "pdserve": gRPC at `target`; "openai": HTTP at `base_url`
    base_url: str | None = None
    model: str | None = None  # openai backend: the model to ask for (None: the server's first)


@dataclass(slots=True)
class RunResult:
    """The records of one run (one arrival setting) and how it ended."""

    arrival: Arrival
    records: list[RequestRecord]
    planned: int  # requests the workload had; fewer were sent if the time limit hit
    stopped_by_time_limit: bool = False
    warmup_records: list[RequestRecord] = field(default_factory=list)


async def run_load(
    client: GenerationClient | OpenAIClient,
    requests: Sequence[RequestSpec],
    arrival: Arrival,
    *,
    seed: int,
    time_limit: float | None = None,
    id_prefix: str = "bench-",
    progress: bool = True,
) -> RunResult:
    """Send ``requests`` under ``arrival`` and return their records in workload order.

    Request ``i`` is sampled with seed ``seed + i``, so every run and every compared config
    asks for the same outputs.
    """
    offsets = arrival.send_offsets(len(requests), seed)
    slots = asyncio.Semaphore(arrival.concurrency) if arrival.concurrency else None
    bar = tqdm(total=len(requests), desc=arrival.label, unit="req", disable=not progress)

    async def one(index: int, spec: RequestSpec) -> RequestRecord:
        try:
            return await client.generate(spec, f"{id_prefix}{index}", seed=seed + index)
        finally:
            if slots is not None:
                slots.release()
            bar.update(1)

    tasks: list[asyncio.Task[RequestRecord]] = []
    stopped = False
    start = time.perf_counter()
    try:
        for index, (spec, offset) in enumerate(zip(requests, offsets, strict=True)):
            if time_limit is not None and offset >= time_limit:
                stopped = True
                break
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            if time_limit is not None and time.perf_counter() - start >= time_limit:
                if slots is not None:
                    slots.release()
                stopped = True
                break
            tasks.append(asyncio.create_task(one(index, spec)))
        records = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # only matters when we are unwinding from an error or Ctrl-C
        bar.close()
    return RunResult(arrival, records, len(requests), stopped)


def make_client(settings: RunSettings) -> GenerationClient | OpenAIClient:
    """The client of ``settings.backend``: both have ``connect``, ``generate`` and ``close``."""
    common = dict(
        request_timeout=settings.request_timeout,
        force_output_len=settings.force_output_len,
        temperature=settings.temperature,
        api_key=settings.api_key,
        ca_file=settings.ca_file,
    )
    if settings.backend == "openai":
        from pdserve.bench.openai_client import OpenAIClient

        return OpenAIClient(settings.base_url or "", model=settings.model, **common)
    return GenerationClient(settings.target, **common)


async def benchmark(
    settings: RunSettings,
    requests: Sequence[RequestSpec],
    arrivals: Sequence[Arrival],
    warmup: Sequence[RequestSpec] = (),
    sweep_requests: Sequence[Sequence[RequestSpec]] | None = None,
) -> tuple[dict[str, Any], list[RunResult]]:
    """Connect, run the warm-up once, then one run per arrival setting (a rate sweep).

    `sweep_requests[k]`, when given, is the workload of the k-th run: a sweep then sends
    different prompts at each rate, so a server's prefix cache cannot serve a later rate
    from an earlier one's prompts.

    Returns the server's Health report and the runs. Raises ServerUnreachable before
    sending anything when the target cannot be reached.
    """
    client = make_client(settings)
    # A fresh id per invocation so repeated runs never reuse request ids on one server.
    run_id = uuid.uuid4().hex[:8]
    try:
        health = await client.connect(settings.connect_timeout)
        warm = await asyncio.gather(
            *(
                client.generate(spec, f"bench-{run_id}-warmup-{i}", seed=settings.seed + i)
                for i, spec in enumerate(warmup)
            )
        )
        results = []
        for number, arrival in enumerate(arrivals):
            result = await run_load(
                client,
                sweep_requests[number] if sweep_requests else requests,
                arrival,
                seed=settings.seed,
                time_limit=settings.time_limit,
                id_prefix=f"bench-{run_id}-{number}-",
                progress=settings.progress,
            )
            results.append(result)
        if results:
            results[0].warmup_records = list(warm)
        return health, results
    finally:
        await client.close()
