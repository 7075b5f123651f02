"""The global KV store in a real cluster (2P1D on local Ray, the launcher's own
redis-server, one store actor and its shared-memory pool): a prefix prefilled on one
prefill worker is loaded from the store by the other, which prefills only the new suffix;
Redis killed while requests run and the store actor killed leave every answer right;
Redis back brings hits back. Tokens equal HF transformers' greedy output and every
worker's blocks come back."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from cluster_checks import (
    assert_blocks_back,
    free_blocks,
    hf_greedy,
    running_cluster,
    worker_stats,
)

from pdserve.engine.loader.registry import open_model

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
BS = 16
CONFIG = {
    "model": {"name": MODEL},
    "transport": "grpc",
    "kv": {"block_size": BS, "memory_mb": 32},
    "prefill": {"count": 2, "num_cpus": 0.5},
    "decode": {"count": 1, "num_cpus": 0.5},
    "kv_store": {"enabled": True, "pool_mb": 64, "store_lease_seconds": 1.0},
    "ray": {"num_cpus": 4},
}
STORY = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman and "
         "his three daughters. Every morning before the sun rose over the hills, the old man "
         "pushed his little blue boat into the water, and every evening")
N = 6


@pytest.fixture(scope="module")
def served():
    with running_cluster(CONFIG) as (bg, client):
        yield bg, client


@pytest.fixture(scope="module")
def tokenizer():
    return open_model(MODEL).tokenizer


def prefill_tokens(client) -> dict[str, int]:
    return {w: s.prompt_tokens_processed for w, s in worker_stats(client).items()
            if w.startswith("prefill")}


def ask(client, text: str) -> list[int]:
    return client.generate(text, max_tokens=N, min_tokens=N, temperature=0)["token_ids"]


def test_a_prefix_prefilled_on_one_worker_is_loaded_by_the_other(served, tokenizer, hf_model):
    _, client = served
    start = free_blocks(client)
    first, second = STORY + " he sang to the fish.", STORY + " the daughters cooked supper."
    a, b = tokenizer.encode(first), tokenizer.encode(second)
    shared = next(i for i in range(len(a)) if a[i] != b[i]) // BS * BS
    assert shared >= 2 * BS
    t0 = prefill_tokens(client)
    assert ask(client, first) == hf_greedy(hf_model, a, N)
    t1 = prefill_tokens(client)
    assert ask(client, second) == hf_greedy(hf_model, b, N)
    t2 = prefill_tokens(client)
    first_on = [w for w in t0 if t1[w] > t0[w]]
    second_on = [w for w in t0 if t2[w] > t1[w]]
    assert first_on != second_on, "the router sent both prompts to one prefill worker"
    assert sum(t1.values()) - sum(t0.values()) == len(a)
    assert sum(t2.values()) - sum(t1.values()) == len(b) - shared  # the prefix came loaded
    assert_blocks_back(client, start)


def test_redis_killed_mid_load_and_store_killed_keep_answers_right(served, tokenizer,
                                                                    hf_model):
    bg, client = served
    start = free_blocks(client)
    texts = [STORY + f" the {w} came home." for w in ("cat", "dog", "goat", "boy")]
    want = [hf_greedy(hf_model, tokenizer.encode(t), N) for t in texts]
    redis = bg.cluster.kv_store.redis
    got: dict[int, list[int]] = {}

    def one(i: int) -> None:
        got[i] = ask(client, texts[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    time.sleep(0.3)
    redis.kill()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(len(texts))] == want
    assert_blocks_back(client, start)

    redis.start()  # same port and password, empty: the store re-registers, puts refill it
    time.sleep(2.0)
    fresh = ("In the winter of that year the snow fell for forty days, and in the mountain "
             "villages the people told stories by the fire about the wolves that came down "
             "from the forest at night, and about")
    a, b = tokenizer.encode(fresh + " the hunter"), tokenizer.encode(fresh + " the moon")
    shared = next(i for i in range(len(a)) if a[i] != b[i]) // BS * BS
    assert shared >= 2 * BS
    t0 = prefill_tokens(client)
    assert ask(client, fresh + " the hunter") == hf_greedy(hf_model, a, N)
    t1 = prefill_tokens(client)
    assert ask(client, fresh + " the moon") == hf_greedy(hf_model, b, N)
    t2 = prefill_tokens(client)
    assert [w for w in t0 if t1[w] > t0[w]] != [w for w in t0 if t2[w] > t1[w]]
    assert sum(t2.values()) - sum(t1.values()) == len(b) - shared  # hits are back

    # The store process dies: its pool stops being findable within its lease; answers stay
    # right (each prefill worker still has its own prefix cache, the rest is recomputed).
    for actor in bg.cluster.kv_store.actors.values():
        ray.kill(actor)
    time.sleep(1.5)
    for t, w in zip(texts, want):
        assert ask(client, t) == w
    assert_blocks_back(client, start)


def test_32_concurrent_shared_prefix_requests(served, tokenizer, hf_model):
    bg, client = served
    deadline = time.monotonic() + 60  # the launcher replaces the store actor killed before
    while not all(p.get("capacity_blocks") for p in _pools(bg)):
        assert time.monotonic() < deadline, "the killed store actor was not replaced"
        time.sleep(0.5)
    start = free_blocks(client)
    texts = [STORY + f" the number {i} was" for i in range(8)]
    want = {t: hf_greedy(hf_model, tokenizer.encode(t), 4) for t in texts}
    got: dict[int, list[int]] = {}

    def one(i: int) -> None:
        got[i] = client.generate(texts[i % 8], max_tokens=4, min_tokens=4,
                                 temperature=0)["token_ids"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [got.get(i) for i in range(32)] == [want[texts[i % 8]] for i in range(32)]
    assert_blocks_back(client, start)
    pools = _pools(bg)
    assert pools and all(p["pinned_blocks"] == 0 and p["used_blocks"] > 0 for p in pools)


def _pools(bg) -> list[dict]:
    try:
        return bg.cluster.kv_store.stats(timeout=5)
    except ray.exceptions.RayActorError:
        return [{}]  # dead, not replaced yet
