"""Worker death on a real 2P2D cluster (real Ray, gRPC, SmolLM2): a decode worker's process
killed mid-stream, a prefill worker's mid-prefill, both decode workers at once. Streams
migrate or retry and end with exactly HF's greedy tokens (or a clear UNAVAILABLE when no
decode worker is left); Health and Admin.Stats tell the truth meanwhile; the supervisor
brings the pools back to their configured size; every worker's free blocks return to their
start. Also here, on the same cluster: a lease shorter than the prefills is renewed, not
expired, and a cancel storm of long prompts frees every reservation within a second."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import pytest
import ray
from cluster_checks import (
    assert_blocks_back,
    cluster_fixtures,
    collect,
    hf_greedy,
    worker_stats,
)

from pdserve.cluster.cli import main as pdserve_main
from pdserve.engine.loader.registry import open_model

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
LEASE_S = 0.6  # far below how long the queued prefills below take: renewals must carry them
CONFIG = {
    "model": {"name": MODEL},
    "transport": "grpc",
    "kv": {"memory_mb": 96},
    # Four actors (and a replacement starting beside them) on a 2-core machine.
    "prefill": {"count": 2, "num_cpus": 0.4, "max_num_batched_tokens": 128},
    "decode": {"count": 2, "num_cpus": 0.4},
    "router": {"lease_seconds": LEASE_S, "handoff_retries": 2},
    "health": {"probe_interval": 0.25},
    "ray": {"num_cpus": 3},
}
N = 16  # tokens per stream
SHORT = ["The capital of France is a city where", "Once upon a time, a small robot",
         "The best way to learn a language is", "In the middle of the ocean there"]
RECOVERY_S = 120.0  # a replacement loads the model: generous on a loaded 2-core machine


served, client, start_blocks = cluster_fixtures(CONFIG)


@pytest.fixture(scope="module")
def tokenizer():
    return open_model(MODEL).tokenizer


@pytest.fixture(scope="module")
def short_prompts(tokenizer, hf_model) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, HF's greedy N tokens) for each short prompt."""
    out = []
    for text in SHORT:
        ids = tokenizer.encode(text)
        out.append((ids, hf_greedy(hf_model, ids, N)))
    return out


def long_prompt(tokenizer, seed: int, n: int = 360) -> list[int]:
    """A distinct long prompt (no cached prefix shared with the others)."""
    words = f"Item {seed}: " + " ".join(f"w{seed}x{i}" for i in range(n))
    return tokenizer.encode(words)[:n]


class Streams:
    """Requests streamed on threads; each result is the collected dict or the RpcError."""

    def __init__(self, client, prompts: list[list[int]], n: int = N):
        self.results: list = [None] * len(prompts)
        self.first_token = [threading.Event() for _ in prompts]
        self.threads = [threading.Thread(target=self._run, args=(client, i, p, n), daemon=True)
                        for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    def _run(self, client, i: int, prompt: list[int], n: int) -> None:
        def marked(responses):
            for r in responses:
                if r.token_ids:
                    self.first_token[i].set()
                yield r

        try:
            self.results[i] = collect(marked(client.stream(
                prompt, max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)))
        except grpc.RpcError as e:
            self.results[i] = e
        finally:
            self.first_token[i].set()

    def wait_first_tokens(self, timeout: float = 120.0) -> None:
        for e in self.first_token:
            assert e.wait(timeout), "a stream got no token"

    def join(self, timeout: float = 180.0) -> list:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
            assert not t.is_alive(), "a stream hung after a worker died"
        return self.results


def kill(handle) -> None:
    pid = ray.get(handle.ready.remote(), timeout=30)["pid"]
    os.kill(pid, signal.SIGKILL)


def wait_until(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(interval)


def assert_recovered(client, start_blocks) -> None:
    """Back to the configured size and serving, every worker's blocks back at the start."""
    def whole():
        h = client.health()
        return h.serving and (h.prefill_workers, h.decode_workers) == (2, 2) \
            and not h.workers_down

    wait_until(whole, RECOVERY_S, "the pools back at 2 prefill + 2 decode workers up")
    assert {w.worker_id: w.state for w in client.stats().workers} == {
        "prefill-0": "up", "prefill-1": "up", "decode-0": "up", "decode-1": "up"}
    assert_blocks_back(client, start_blocks)


def busy_worker(client, role: str) -> str | None:
    for wid, w in worker_stats(client).items():
        if w.role == role and w.state == "up" and (w.running or w.waiting):
            return wid
    return None


def handle_of(bg, worker_id: str):
    kind, index = worker_id.rsplit("-", 1)
    handles = bg.cluster.prefill_handles if kind == "prefill" else bg.cluster.decode_handles
    return handles[int(index)]


def test_a_lease_shorter_than_the_prefill_is_renewed_not_expired(client, start_blocks,
                                                                  tokenizer, hf_model):
    """Six long prompts queue on two prefill workers for several times the lease; the
    router keeps each reservation alive while its prefill runs, so none is thrown away and
    redone: no lease expires, no handoff is retried, every answer is HF's."""
    prompts = [long_prompt(tokenizer, s) for s in range(6)]
    before = client.stats()
    t0 = time.monotonic()
    results = Streams(client, prompts, n=4).join()
    took = time.monotonic() - t0
    assert took > 3 * LEASE_S, f"the prefills took {took:.1f}s: too fast to test the lease"
    for prompt, result in zip(prompts, results):
        assert not isinstance(result, grpc.RpcError), result
        assert result["token_ids"] == hf_greedy(hf_model, prompt, 4)
    after = client.stats()
    assert after.handoff_retries == before.handoff_retries
    assert sum(w.leases_expired for w in after.workers) == 0
    assert_blocks_back(client, start_blocks)


def test_a_cancel_storm_of_long_prompts_frees_every_block_within_a_second(client,
                                                                         start_blocks,
                                                                         tokenizer):
    """Ten long prompts cancelled right after sending, in every phase (before the reserve
    answered, before the prefill started, while it runs): every reservation and every
    prefill is freed by the abort, not by a lease or a finished prefill."""
    calls = []
    for s in range(10):
        req = client.request(long_prompt(tokenizer, 100 + s, n=500), max_tokens=4)
        calls.append(client.generation.Generate(req, timeout=60))
        time.sleep(0.03)
    for call in calls:
        call.cancel()
    assert_blocks_back(client, start_blocks, timeout=1.0)


def test_decode_worker_killed_mid_stream_every_stream_migrates(served, start_blocks,
                                                                short_prompts, capsys):
    bg, client = served
    streams = Streams(client, [ids for ids, _ in short_prompts] * 2)
    streams.wait_first_tokens()
    victim = wait_until(lambda: busy_worker(client, "decode"), 30, "a decode worker busy")
    kill(handle_of(bg, victim))

    # Health and Stats tell the truth while the replacement starts (it loads the model).
    health = wait_until(lambda: (h := client.health()).workers_down and h, 10,
                        "Health reporting the killed worker")
    assert list(health.workers_down) == [victim] and health.decode_workers == 1
    assert health.serving  # one decode worker is enough to serve
    states = {w.worker_id: w.state for w in client.stats().workers}
    assert len(states) == 4 and states.pop(victim) == "down"
    assert set(states.values()) == {"up"}
    capsys.readouterr()
    assert pdserve_main(["stats", "--target", bg.address]) == 0
    shown = capsys.readouterr().out
    assert re.search(rf"{victim}\s+decode\s+DOWN", shown), shown
    assert all(re.search(rf"{w}\s+\S+\s+\d+/\d+", shown) for w in states), shown

    results = streams.join()
    for (_, expected), result in zip(short_prompts * 2, results):
        assert not isinstance(result, grpc.RpcError), result.details()
        assert result["token_ids"] == expected
        assert result["finish_reason"] == "length" and result["usage"].completion_tokens == N
    stats = client.stats()
    assert stats.migrations >= 1 and stats.requests_finished >= len(results)

    # New requests are served at once by the survivor (the next test kills it too, while
    # this one's replacement may still be starting).
    ids, expected = short_prompts[0]
    assert client.generate(ids, max_tokens=N, min_tokens=N, temperature=0)["token_ids"] \
        == expected


def test_no_decode_worker_left_is_a_clear_error_then_service_returns(served, start_blocks,
                                                                     short_prompts):
    """Every decode worker that is up killed mid-stream (right after the previous test
    killed the other one): each stream ends at once, either complete (it finished, or
    migrated onto a replacement that was ready) or with UNAVAILABLE naming the cause, never
    a hang or a Ray traceback; Health says not serving while no decode worker is up. Then
    the supervisor brings both back."""
    bg, client = served
    streams = Streams(client, [ids for ids, _ in short_prompts])
    streams.wait_first_tokens()
    down = set(client.health().workers_down)
    for i, handle in enumerate(list(bg.cluster.decode_handles)):
        if f"decode-{i}" not in down:
            kill(handle)
    results = streams.join(timeout=60)
    for (_, expected), result in zip(short_prompts, results):
        if isinstance(result, grpc.RpcError):
            details = result.details()
            assert result.code() == grpc.StatusCode.UNAVAILABLE, details
            assert "no decode worker is up" in details or "is down" in details, details
            assert "Traceback" not in details and "ray" not in details.lower(), details
        else:
            assert result["token_ids"] == expected
    health = client.health()
    if health.decode_workers == 0:
        assert not health.serving
        with pytest.raises(grpc.RpcError) as err:
            client.generate(short_prompts[0][0], max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_recovered(client, start_blocks)
    ids, expected = short_prompts[1]
    assert client.generate(ids, max_tokens=N, min_tokens=N, temperature=0)["token_ids"] \
        == expected
    assert client.stats().workers_replaced >= 2


def test_prefill_worker_killed_mid_prefill_is_retried_on_the_other(served, start_blocks,
                                                                    tokenizer, hf_model):
    bg, client = served
    prompts = [long_prompt(tokenizer, s) for s in range(10, 14)]
    streams = Streams(client, prompts, n=4)
    victim = wait_until(lambda: busy_worker(client, "prefill"), 60, "a prefill worker busy",
                        interval=0.01)
    kill(handle_of(bg, victim))
    results = streams.join()
    for prompt, result in zip(prompts, results):
        assert not isinstance(result, grpc.RpcError), result.details()
        assert result["token_ids"] == hf_greedy(hf_model, prompt, 4)
    assert_recovered(client, start_blocks)
