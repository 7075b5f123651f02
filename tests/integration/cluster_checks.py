"""Helpers the cluster tests share: start a real cluster, read its workers' KV accounting
through `Admin.Stats`, fold streamed responses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from testkit import hf_greedy  # noqa: F401 (re-exported for the cluster tests)

from pdserve.cluster.background import BackgroundCluster
from pdserve.cluster.client import PdserveClient
from pdserve.cluster.config import parse_config
from pdserve.proto import pb


@contextmanager
def running_cluster(config: dict) -> Iterator[tuple[BackgroundCluster, PdserveClient]]:
    """A real local Ray + actors + gRPC router on a free port, and a client for it."""
    cfg = parse_config({**config, "router": {"port": 0, "http_port": 0,
                                             **config.get("router", {})}})
    with BackgroundCluster(cfg) as bg, PdserveClient(bg.address, timeout=120) as client:
        yield bg, client


def cluster_fixtures(config: dict):
    """The module-scoped fixtures most cluster test files start from: `served` (the
    running cluster and its client), `client`, and `start_blocks` (every worker's free KV
    blocks before any test ran). Use: `served, client, start_blocks = cluster_fixtures(CFG)`."""

    @pytest.fixture(scope="module")
    def served():
        with running_cluster(config) as pair:
            yield pair

    @pytest.fixture(scope="module")
    def client(served) -> PdserveClient:
        return served[1]

    @pytest.fixture(scope="module")
    def start_blocks(client) -> dict[str, int]:
        return free_blocks(client)

    return served, client, start_blocks


def worker_stats(client: PdserveClient) -> dict[str, pb.WorkerStats]:
    return {w.worker_id: w for w in client.stats().workers}


def free_blocks(client: PdserveClient) -> dict[str, int]:
    return {wid: w.free_blocks for wid, w in worker_stats(client).items()}


def assert_blocks_back(client: PdserveClient, start: dict[str, int],
                       timeout: float = 10.0) -> None:
    """Every worker's free KV blocks return to `start` and nothing is left running or
    reserved (a decode worker counts uncommitted reservations as waiting). Aborts travel
    asynchronously, so poll for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = worker_stats(client)
        now = {wid: w.free_blocks for wid, w in stats.items()}
        busy = {wid: (w.running, w.waiting) for wid, w in stats.items() if w.running or w.waiting}
        if now == start and not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f}s free blocks are {now}, expected {start}; "
                                 f"still running/waiting: {busy}")
        time.sleep(0.1)


def collect(responses) -> dict:
    """Fold a stream of GenerateResponse into token ids, text pieces, finish and usage."""
    ids, texts, last, count = [], [], None, 0
    for r in responses:
        ids.extend(r.token_ids)
        texts.append(r.text)
        last, count = r, count + 1
    return {"token_ids": ids, "texts": texts, "text": "".join(texts), "responses": count,
            "finish_reason": last.finish_reason if last else "",
            "usage": last.usage if last else None}
