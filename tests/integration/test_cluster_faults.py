"""Fault paths of the KV handoff on a real 1P1D cluster: injected transfer failures are
retried or answered UNAVAILABLE, an orphaned decode reservation is freed by its lease, and
no path leaks a block on either side."""

from __future__ import annotations

import time

import grpc
import pytest
import ray
from cluster_checks import (
    assert_blocks_back,
    cluster_fixtures,
    hf_greedy,
    worker_stats,
)

from pdserve.engine import SamplingParams
from pdserve.engine.loader.registry import open_model
from pdserve.kv_transfer import KVTransferError
from pdserve.messages import WorkerRequest
from pdserve.proto import pb

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
INJECTED_FAILURES = 3  # request 1: fail + fail (UNAVAILABLE); request 2: fail + ok; then none
CONFIG = {
    "model": {"name": MODEL},
    "transport": "grpc",
    "kv": {"memory_mb": 32},
    "router": {"handoff_retries": 1},
    "debug": {"inject_transfer_failures": INJECTED_FAILURES},
}
PROMPT = "The capital of France is a city where"
N = 8


served, client, start_blocks = cluster_fixtures(CONFIG)


@pytest.fixture(scope="module")
def expected(hf_model) -> list[int]:
    return hf_greedy(hf_model, open_model(MODEL).tokenizer.encode(PROMPT), N)


def generate(client) -> dict:
    return client.generate(PROMPT, max_tokens=N, min_tokens=N, temperature=0)


def test_handoff_failing_every_attempt_is_unavailable(client, start_blocks):
    """Failures 1 and 2: the first attempt and its one retry both fail, so the client gets
    UNAVAILABLE with the reason (not a remote stack trace), and nothing leaks."""
    with pytest.raises(grpc.RpcError) as err:
        generate(client)
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details.startswith("KV handoff failed after 2 attempts: injected transfer failure")
    assert "Traceback" not in details and 'File "' not in details and "\x1b[" not in details
    stats = client.stats()
    assert stats.handoff_retries == 1
    assert (stats.requests_finished, stats.queued_requests) == (0, 0)
    assert_blocks_back(client, start_blocks)


def test_failed_handoff_is_retried_and_succeeds(client, start_blocks, expected):
    """Failure 3: the first attempt fails, the retry succeeds with the right tokens."""
    retries = client.stats().handoff_retries
    out = generate(client)
    assert out["token_ids"] == expected and out["finish_reason"] == "length"
    assert out["usage"].completion_tokens == N
    assert client.stats().handoff_retries == retries + 1
    assert_blocks_back(client, start_blocks)

    # The injected failures are used up: the next request needs no retry.
    assert generate(client)["token_ids"] == expected
    assert client.stats().handoff_retries == retries + 1
    assert_blocks_back(client, start_blocks)


def test_orphaned_reservation_is_freed_by_its_lease(served, start_blocks):
    """A decode reservation whose prefill never comes frees its blocks when the lease
    expires; a prefill that turns up after that is refused and frees its own blocks."""
    bg, client = served
    decode, prefill = bg.cluster.decode_handles[0], bg.cluster.prefill_handles[0]
    ids = open_model(MODEL).tokenizer.encode("word " * 40)[:40]
    t0 = time.monotonic()
    sink = ray.get(decode.reserve.remote("orphan-1", len(ids), 4, 1.0))
    assert len(sink["block_ids"]) == 3
    held = worker_stats(client)["decode-0"]
    assert held.free_blocks == start_blocks["decode-0"] - 3 and held.waiting == 1

    assert_blocks_back(client, start_blocks, timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert ray.get(decode.stats.remote())["leases_expired"] == 1

    late = WorkerRequest("orphan-1", tuple(ids),
                         SamplingParams(temperature=0, max_tokens=4, seed=0)).to_dict()
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(prefill.prefill.remote(late, sink), timeout=60)
    assert isinstance(err.value.cause, KVTransferError)
    assert_blocks_back(client, start_blocks)


def test_request_larger_than_the_kv_pool_is_refused_up_front(client, start_blocks):
    """A request within the model's context (8192) but beyond a worker's KV pool (32 MiB:
    45 blocks of 16) could never be reserved: INVALID_ARGUMENT at once, not UNAVAILABLE
    after useless handoff retries; ListModels reports the real limit, which is served."""
    (model,) = client.generation.ListModels(pb.ListModelsRequest(), timeout=30).models
    capacity = start_blocks["decode-0"] * 16  # idle pool: every block is free
    assert model.max_model_len == capacity < 8192
    retries = client.stats().handoff_retries
    ids = [100 + i % 1000 for i in range(capacity)]
    with pytest.raises(grpc.RpcError) as err:
        client.generate(ids, max_tokens=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context length of {capacity}" in err.value.details()
    assert client.stats().handoff_retries == retries

    out = client.generate(ids[:-2], max_tokens=2, temperature=0, ignore_eos=True)
    assert len(out["token_ids"]) == 2
    assert_blocks_back(client, start_blocks)
