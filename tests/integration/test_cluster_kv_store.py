"""The global KV store in a real cluster (2P2D on local Ray, the launcher's own
redis-server, one store actor and its shared-memory pool) with the KV-aware router (the
default with the store on): a prompt sharing a prefix goes back to the prefill worker that
holds it; while that worker is busy it goes to the other one, which loads the prefix from
the store and prefills only the new suffix; Admin.Stats shows the pool's figures. Redis
killed while requests run and the store actor killed leave every answer right; Redis back
brings hits back. The router knows each worker's own prefix cache exactly from what the
workers publish to the index (evictions included). Tokens equal HF transformers' greedy
output and every worker's blocks come back."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import redis
from cluster_checks import (
    assert_blocks_back,
    free_blocks,
    hf_greedy,
    running_cluster,
    worker_stats,
)

from pdserve.engine.loader.registry import open_model
from pdserve.kv_store.index import worker_cache_key

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
BS = 16
CONFIG = {
    "model": {"name": MODEL},
    "transport": "grpc",
    "kv": {"block_size": BS, "memory_mb": 48},
    "prefill": {"count": 2, "num_cpus": 0.5},
    "decode": {"count": 2, "num_cpus": 0.5},
    "kv_store": {"enabled": True, "pool_mb": 64, "store_lease_seconds": 1.0},
    "ray": {"num_cpus": 4},
}
STORY = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman and "
         "his three daughters. Every morning before the sun rose over the hills, the old man "
         "pushed his little blue boat into the water, and every evening")
# A long ending: its prefill keeps a worker busy for seconds on this CPU.
LONG_TAIL = " he came back with a story, and " + " ".join(
    f"on day {i} he saw a {c} bird fly over the harbour wall," for i, c in
    zip(range(1, 30), ["red", "grey", "white", "black", "small", "tall"] * 5))
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


def generated(client) -> dict[str, int]:
    return {w: s.generated_tokens for w, s in worker_stats(client).items()
            if w.startswith("decode")}


def store_hits(client) -> dict[str, int]:
    return {w: s.store_hit_tokens for w, s in worker_stats(client).items()
            if w.startswith("prefill")}


def ask(client, text: str, n: int = N) -> list[int]:
    return client.generate(text, max_tokens=n, min_tokens=n, temperature=0)["token_ids"]


def shared_blocks(a: list[int], b: list[int]) -> int:
    """Tokens of the whole blocks `a` and `b` share."""
    return next(i for i in range(min(len(a), len(b))) if a[i] != b[i]) // BS * BS


def reuse_across_workers(client, tokenizer, hf_model, prefix: str, first: str,
                         second: str) -> None:
    """`prefix + first` is prefilled on worker A; `prefix + LONG_TAIL` goes to A as well
    (it holds the prefix) and keeps it busy; `prefix + second`, routed meanwhile, goes to
    the idle worker B, which loads the prefix from the store and computes only the rest."""
    a, long, b = (tokenizer.encode(prefix + t) for t in (first, LONG_TAIL, second))
    shared_long, shared = shared_blocks(a, long), shared_blocks(a, b)
    assert shared >= 2 * BS and len(long) > 400
    t0 = prefill_tokens(client)
    assert ask(client, prefix + first) == hf_greedy(hf_model, a, N)
    t1 = prefill_tokens(client)
    (on_a,) = [w for w in t0 if t1[w] > t0[w]]
    assert t1[on_a] - t0[on_a] == len(a)
    got: list[list[int]] = []
    busy = threading.Thread(target=lambda: got.append(ask(client, prefix + LONG_TAIL, 2)))
    busy.start()
    deadline = time.monotonic() + 60
    while not (lambda s: s.running + s.waiting)(worker_stats(client)[on_a]):
        assert time.monotonic() < deadline, f"the long prompt never reached {on_a}"
        time.sleep(0.01)
    h0 = store_hits(client)
    assert ask(client, prefix + second) == hf_greedy(hf_model, b, N)
    busy.join(120)
    t2, h1 = prefill_tokens(client), store_hits(client)
    (on_b,) = [w for w in t0 if w != on_a]
    assert t2[on_b] - t1[on_b] == len(b) - shared, "B did not load the prefix from the store"
    assert h1[on_b] - h0[on_b] == shared
    assert t2[on_a] - t1[on_a] == len(long) - shared_long, "the long prompt left its prefix"
    assert got == [hf_greedy(hf_model, long, 2)]


def test_a_shared_prefix_goes_where_it_is_cached_or_is_loaded_from_the_store(
        served, tokenizer, hf_model):
    _, client = served
    start = free_blocks(client)
    reuse_across_workers(client, tokenizer, hf_model, STORY, " he sang to the fish.",
                         " the daughters cooked supper.")
    # The same prefix again, both workers idle: it goes to one that holds it and computes
    # only its own ending.
    c = tokenizer.encode(STORY + " the cat slept.")
    t0 = prefill_tokens(client)
    assert ask(client, STORY + " the cat slept.") == hf_greedy(hf_model, c, N)
    t1 = prefill_tokens(client)
    assert sum(t1.values()) - sum(t0.values()) == len(c) - shared_blocks(
        c, tokenizer.encode(STORY + " he sang to the fish."))
    assert_blocks_back(client, start)

    stats = client.stats()
    assert stats.routing_policy == "kv_aware"
    (pool,) = stats.kv_store
    assert pool.state == "up" and pool.tier == "cpu" and pool.capacity_blocks > 0
    assert 0 < pool.used_blocks <= pool.capacity_blocks and pool.puts >= pool.used_blocks
    assert pool.pinned_blocks == 0  # nothing is being read now
    workers = stats.workers
    assert pool.hit_tokens == sum(w.store_hit_tokens for w in workers) > 0
    assert pool.hit_blocks * BS == pool.hit_tokens and pool.lookups > 0
    assert 0 < pool.token_hit_rate < 1


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
    # With Redis away a prefill's blocks cannot be published: the saves are dropped and
    # counted (Admin.Stats, /metrics), the answer is still right.
    skipped = sum(w.store_save_skipped for w in client.stats().workers)
    alone = ("A lighthouse keeper on a rocky island kept a journal of every ship that "
             "passed, the weather of each morning and the birds that rested on the rail")
    assert ask(client, alone) == hf_greedy(hf_model, tokenizer.encode(alone), N)
    assert sum(w.store_save_skipped for w in client.stats().workers) > skipped

    redis.start()  # same port and password, empty: the store re-registers, puts refill it
    time.sleep(2.0)
    fresh = ("In the winter of that year the snow fell for forty days, and in the mountain "
             "villages the people told stories by the fire about the wolves that came down "
             "from the forest at night, and about")
    reuse_across_workers(client, tokenizer, hf_model, fresh, " the hunter",
                         " the moon")  # hits are back

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


def test_the_router_reads_each_workers_cache_exactly_from_its_published_events(
        served, tokenizer, hf_model):
    """A prompt served by prefill worker A and decode worker D: the router's locator
    reports A's and D's copies of its prefix block for block, read from what they
    published; a prompt with that prefix goes to A, which computes only its own ending,
    and to D; once A's pool evicted the blocks, A no longer claims them."""
    bg, client = served
    start = free_blocks(client)
    policy = bg.cluster.router.policy
    url = bg.cluster._worker_cfg.kv_store.redis_url
    prefix = ("Far to the north, where the rivers freeze in autumn, a young shepherd kept "
              "a flock of two hundred sheep and one stubborn goat named Pepper, and every")
    a = tokenizer.encode(prefix + " night she counted them twice.")
    held = (len(a) - 1) // BS * BS
    t0, g0 = prefill_tokens(client), generated(client)
    assert ask(client, prefix + " night she counted them twice.") == hf_greedy(hf_model, a, N)
    t1, g1 = prefill_tokens(client), generated(client)
    (on_a,) = [w for w in t0 if t1[w] > t0[w]]
    (on_b,) = [w for w in t0 if w != on_a]
    (on_d,) = [w for w in g0 if g1[w] > g0[w]]
    (on_e,) = [w for w in g0 if w != on_d]

    def where(ids):
        return bg.on_router(policy.locate(ids))

    deadline = time.monotonic() + 10
    while where(a).local_tokens(on_a) < held:  # published within one interval
        assert time.monotonic() < deadline, f"{on_a} never published the prompt's blocks"
        time.sleep(0.05)
    while where(a).local_tokens(on_d) < held:
        assert time.monotonic() < deadline, f"{on_d} never published the prompt's blocks"
        time.sleep(0.05)
    got = where(a)
    assert got.local_tokens(on_a) == got.local_tokens(on_d) == held
    assert got.local_tokens(on_b) == got.local_tokens(on_e) == 0
    with redis.Redis.from_url(url) as r:  # that is what the workers wrote, hash by hash
        published = r.hmget(worker_cache_key("pdkv", on_a), list(got.hashes))
        assert all(published)

    c = tokenizer.encode(prefix + " morning the goat ran off.")
    shared = shared_blocks(a, c)
    assert_blocks_back(client, start)  # both decode workers equally free (the router polls)
    assert ask(client, prefix + " morning the goat ran off.") == hf_greedy(hf_model, c, N)
    t2, g2 = prefill_tokens(client), generated(client)
    assert (t2[on_a] - t1[on_a], t2[on_b] - t1[on_b]) == (len(c) - shared, 0)
    assert g2[on_d] > g1[on_d] and g2[on_e] == g1[on_e]  # D holds the prefix too

    # Long unrelated prompts until A's pool has reused every block of the prefix: its
    # claim goes with them.
    for i in range(8):
        if where(a).local_tokens(on_a) == 0:
            break
        filler = f"Ledger {i}: " + " ".join(f"row {i}{j} holds {j * 7 + i} sacks;"
                                           for j in range(50))
        client.generate(filler, max_tokens=1, temperature=0)
        time.sleep(0.2)  # one publish interval and then some
    got = where(a)
    assert got.local_tokens(on_a) == 0, f"{on_a} still claims the prefix after 8 prompts"
    with redis.Redis.from_url(url) as r:
        assert not any(r.hmget(worker_cache_key("pdkv", on_a), list(got.hashes)))
    assert_blocks_back(client, start)


def test_a_prefix_outlives_the_worker_that_computed_it(served, tokenizer, hf_model):
    """A prompt prefilled on worker A, then A killed: the supervisor replaces it, and the
    same prefix is loaded from the store wherever it lands next (A's own cache died with A,
    and no other worker ever computed it): only the new ending is prefilled, the tokens are
    HF's, and every worker's blocks are back."""
    bg, client = served
    start = free_blocks(client)
    prefix = ("High in the mountains above the old mining town, a young engineer kept a "
              "notebook of every bridge she had ever crossed, and on the first page she "
              "had written the names of the rivers beneath them, one by one, until")
    a, b = (tokenizer.encode(prefix + t) for t in (" the ink ran out.", " the rain came."))
    shared = shared_blocks(a, b)
    assert shared >= 2 * BS
    puts0 = client.stats().kv_store[0].puts
    t0 = prefill_tokens(client)
    assert ask(client, prefix + " the ink ran out.") == hf_greedy(hf_model, a, N)
    t1 = prefill_tokens(client)
    (on_a,) = [w for w in t0 if t1[w] > t0[w]]
    deadline = time.monotonic() + 30  # saved off the request's path, on A's save thread
    while client.stats().kv_store[0].puts - puts0 < shared // BS:
        assert time.monotonic() < deadline, "A never saved the prompt's blocks to the store"
        time.sleep(0.05)

    ray.kill(bg.cluster.prefill_handles[int(on_a.rsplit("-", 1)[1])], no_restart=True)
    deadline = time.monotonic() + 120  # the replacement loads the model on a busy machine
    while True:
        h = client.health()
        states = {w.worker_id: w.state for w in client.stats().workers}
        if h.serving and h.prefill_workers == 2 and not h.workers_down and \
                prefill_tokens(client)[on_a] == 0 and states[on_a] == "up":
            break  # A is a new process (its counters start again) and is up
        assert time.monotonic() < deadline, f"{on_a} was not replaced: {states}"
        time.sleep(0.2)

    t2, h2 = prefill_tokens(client), store_hits(client)
    assert ask(client, prefix + " the rain came.") == hf_greedy(hf_model, b, N)
    t3, h3 = prefill_tokens(client), store_hits(client)
    assert sum(t3.values()) - sum(t2.values()) == len(b) - shared, "the prefix was recomputed"
    assert sum(h3.values()) - sum(h2.values()) == shared
    assert_blocks_back(client, start)
