"""32 concurrent streams through a real 2P2D cluster give, token for token, what each request
gives when run alone on a colocated worker (the baseline every comparison uses)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_checks import assert_blocks_back, collect, free_blocks, running_cluster, worker_stats

from pdserve.engine.loader.registry import open_model

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
N_STREAMS = 32
PROMPT_LENS = [4, 9, 15, 16, 17, 24, 31, 33, 48, 64, 90, 120, 160, 200, 5, 40]
MAX_TOKENS = [4, 7, 12, 16, 20, 24, 9, 5]
SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}

POOL = {"num_cpus": 0.25, "threads": 1}
# Sized so all 32 requests fit on the decode side at once: a reservation that does not fit
# fails the handoff instead of waiting, which is not what this test is about.
KV = {"memory_mb": 96}
DISAGGREGATED = {
    "model": {"name": MODEL}, "mode": "disaggregated", "transport": "grpc", "kv": KV,
    "prefill": {"count": 2, **POOL}, "decode": {"count": 2, **POOL},
}
# One worker serving one request at a time: it may use both cores.
COLOCATED = {"model": {"name": MODEL}, "mode": "colocated", "kv": KV,
             "decode": {"count": 1, "num_cpus": 0.5, "threads": 2}}


def build_requests() -> list[tuple[list[int], dict]]:
    """(prompt token ids, sampling) of mixed lengths; every other one seeded-sampled."""
    text = " ".join(
        f"Chapter {i}: the travellers crossed river number {i * 7} and counted {i * 13} "
        f"stones, then wrote a letter to town {i % 5} about the weather and the harvest."
        for i in range(12)
    )
    ids = open_model(MODEL).tokenizer.encode(text)
    assert len(ids) > max(PROMPT_LENS) + N_STREAMS
    requests = []
    for i in range(N_STREAMS):
        n = PROMPT_LENS[i % len(PROMPT_LENS)]
        sampling = {"max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)]}
        if i % 2:
            sampling.update(SAMPLED, seed=1000 + i)
        else:
            sampling["temperature"] = 0.0
        requests.append((ids[i:i + n], sampling))
    return requests


@pytest.fixture(scope="module")
def requests():
    return build_requests()


@pytest.fixture(scope="module")
def disaggregated_run(requests) -> dict:
    """Run all streams at once on 2P2D; returns outputs and the workers' stats around it.
    The cluster is stopped on return (one Ray instance per process at a time)."""
    with running_cluster(DISAGGREGATED) as (_, client):
        start = free_blocks(client)
        peak_running: dict[str, int] = {}
        done = threading.Event()

        def watch() -> None:  # how many requests each worker batched together
            while not done.is_set():
                for wid, w in worker_stats(client).items():
                    peak_running[wid] = max(peak_running.get(wid, 0), w.running)
                done.wait(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(N_STREAMS) as pool:
                outs = list(pool.map(lambda r: collect(client.stream(r[0], **r[1])), requests))
        finally:
            done.set()
            watcher.join()
        assert_blocks_back(client, start)
        return {"outputs": outs, "start": start, "end": free_blocks(client),
                "stats": worker_stats(client), "peak_running": peak_running}


@pytest.fixture(scope="module")
def colocated_alone(requests, disaggregated_run) -> list[dict]:
    """Each request alone (one at a time) on a colocated worker. Depends on
    `disaggregated_run` so the 2P2D cluster is gone before this one starts."""
    with running_cluster(COLOCATED) as (_, client):
        start = free_blocks(client)
        outs = [collect(client.stream(ids, **sampling)) for ids, sampling in requests]
        assert_blocks_back(client, start)
        return outs


def test_concurrent_disaggregated_equals_colocated_alone(requests, disaggregated_run,
                                                         colocated_alone):
    for i, ((ids, sampling), got, want) in enumerate(
            zip(requests, disaggregated_run["outputs"], colocated_alone)):
        where = f"stream {i}: {len(ids)} prompt tokens, {sampling}"
        assert got["token_ids"] == want["token_ids"], where
        assert got["text"] == want["text"], where
        assert got["finish_reason"] == want["finish_reason"], where
        assert got["usage"].prompt_tokens == want["usage"].prompt_tokens == len(ids), where
        assert got["usage"].completion_tokens == len(got["token_ids"]), where
        assert 1 <= len(got["token_ids"]) <= sampling["max_tokens"], where
    lengths = [len(o["token_ids"]) for o in disaggregated_run["outputs"]]
    assert max(lengths) > min(lengths)  # mixed output lengths, not one batch shape


def test_every_worker_served_and_blocks_came_back(disaggregated_run):
    stats = disaggregated_run["stats"]
    assert set(stats) == {"prefill-0", "prefill-1", "decode-0", "decode-1"}
    for wid in ("prefill-0", "prefill-1"):
        assert stats[wid].role == "prefill" and stats[wid].prompt_tokens_processed > 0, wid
    for wid in ("decode-0", "decode-1"):
        assert stats[wid].role == "decode" and stats[wid].generated_tokens > 0, wid
    # Continuous batching really happened on the decode side.
    assert max(disaggregated_run["peak_running"][w] for w in ("decode-0", "decode-1")) >= 2
    assert disaggregated_run["end"] == disaggregated_run["start"]
    assert all(v == stats[w].total_blocks for w, v in disaggregated_run["end"].items())
