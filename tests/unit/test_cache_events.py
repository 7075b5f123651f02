"""Workers' own prefix caches published to the store's index and read back by the router,
against a real redis-server (no model): a block manager's stored blocks are located
exactly, evicted ones stop being claimed, a new process (epoch) drops its predecessor's
claims, a worker that stopped publishing is forgotten when its key expires, and Redis down
falls back to the routing estimate without an error, then resyncs when it is back."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.engine.kv_cache.block_manager import BlockManager
from pdserve.kv_store.cache_events import CachePublisher
from pdserve.kv_store.index import StoreIndex, worker_cache_key
from pdserve.router.prefix_locator import PublishedPrefixLocator, prompt_block_hashes

BS = 4
KEY = "content-key"
PROMPT = list(range(100, 141))  # 41 tokens: 10 blocks a cache may cover
HASHES = prompt_block_hashes(PROMPT, BS, KEY)
FULL = len(HASHES) * BS


class Worker:
    """A block manager (the engine's) whose cache events go to a publisher, as a worker's
    do (cluster/actors.py); `prefill` caches a prompt's blocks as the scheduler does."""

    def __init__(self, url: str, worker_id: str, num_blocks: int = 16, **kw):
        self.blocks = BlockManager(num_blocks, BS)
        self.publisher = CachePublisher(StoreIndex(url, retry_s=0.2), worker_id,
                                        **{"interval_s": 2.0, **kw})  # flushed by hand
        self.blocks.prefix_cache.subscribe(self.publisher.on_event)

    def prefill(self, hashes) -> None:
        ids = self.blocks.allocate(len(hashes))
        for b, h in zip(ids, hashes):
            self.blocks.commit_hash(b, h)
        self.blocks.free(reversed(ids))  # as a finished request does: tail first

    def close(self) -> None:
        self.publisher.close()


@pytest.fixture
def url(redis_server) -> str:
    return redis_server.url


class Router:
    """The router's locator on one event loop of its own (its asyncio Redis connection is
    bound to the loop that opened it)."""

    def __init__(self, url: str):
        self.loop = asyncio.new_event_loop()
        self.loc = PublishedPrefixLocator(BS, url, retry_s=0.2, timeout_s=0.2)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def locate(self, workers=("w0", "w1"), hashes=HASHES, nodes=()):
        return self.run(self.loc.locate(len(PROMPT), hashes, list(workers), list(nodes)))

    def close(self) -> None:
        self.run(self.loc.close())
        self.loop.close()


@pytest.fixture
def router(url):
    r = Router(url)
    yield r
    r.close()


def test_published_blocks_are_located_exactly_and_evicted_ones_are_not(url, router):
    w0, w1 = Worker(url, "w0"), Worker(url, "w1")
    try:
        got = router.locate()
        assert got.local_tokens("w0") == got.local_tokens("w1") == 0
        w0.prefill(HASHES[:7])
        assert w0.publisher.flush() == "ok"
        got = router.locate()
        assert got.local_tokens("w0") == 7 * BS and got.local_tokens("w1") == 0
        # 12 other blocks into a 16-block pool: the 3 least recently freed cached blocks,
        # the prefix's tail, are evicted and stop being claimed.
        w0.prefill(prompt_block_hashes(list(range(500, 549)), BS, KEY))
        w0.publisher.flush()
        assert router.locate().local_tokens("w0") == 4 * BS
        w0.blocks.reset_prefix_cache()
        w0.publisher.flush()
        assert router.locate().local_tokens("w0") == 0
        # Stored and evicted again between two writes: only the net change is written.
        w1.prefill(HASHES)
        w1.blocks.reset_prefix_cache()
        w1.prefill(HASHES[:2])
        w1.publisher.flush()
        assert router.locate().local_tokens("w1") == 2 * BS
        index = w1.publisher.index
        assert index._redis.hlen(worker_cache_key("pdkv", "w1")) == 3  # epoch + 2 hashes
    finally:
        w0.close()
        w1.close()
    # Closing withdraws the claims at once.
    assert router.locate().local_tokens("w1") == 0


def test_the_locator_reads_every_worker_and_pool_in_one_round_trip(url, router):
    w0 = Worker(url, "w0")
    index = w0.publisher.index
    try:
        w0.prefill(HASHES)
        w0.publisher.flush()

        def count(hashes):
            before = int(index._redis.info("stats")["total_commands_processed"])
            got = router.locate(("w0", "w1", "w2"), hashes, ["n0"])
            return got, int(index._redis.info("stats")["total_commands_processed"]) \
                - before - 1  # less the INFO call itself

        count(HASHES)  # connects (AUTH)
        (got, used), (_, used_short) = count(HASHES), count(HASHES[:1])
        assert got.local_tokens("w0") == FULL
        assert used == used_short == 2 + 3  # EXISTS + HMGET for the node, HMGET a worker
    finally:
        w0.close()


def test_a_new_process_drops_its_predecessors_claims_and_the_old_one_stops(url, router):
    old = Worker(url, "w0")
    old.prefill(HASHES)
    old.publisher.flush()
    assert router.locate().local_tokens("w0") == FULL
    # The replacement (same worker id, a new process) starts empty: it takes the key over
    # before it reports ready, so the old claims are gone at once.
    new = Worker(url, "w0")
    try:
        assert router.locate().local_tokens("w0") == 0
        old.prefill(prompt_block_hashes(list(range(7, 30)), BS, KEY))
        assert old.publisher.flush() == "taken" and old.publisher.taken
        new.prefill(HASHES[:3])
        new.publisher.flush()
        assert router.locate().local_tokens("w0") == 3 * BS
        old.close()  # withdraws nothing: the key is the new process's
        assert router.locate().local_tokens("w0") == 3 * BS
    finally:
        new.close()


def test_forget_ignores_a_replaced_process_whose_successor_has_not_published(url, router):
    old = Worker(url, "w0")
    try:
        old.prefill(HASHES)
        old.publisher.flush()
        assert router.locate().local_tokens("w0") == FULL
        router.loc.forget("w0")  # replaced; the successor could not reach Redis yet
        assert router.locate().local_tokens("w0") == 0
    finally:
        old.close()
    new = Worker(url, "w0")
    try:
        new.prefill(HASHES[:5])
        new.publisher.flush()
        assert router.locate().local_tokens("w0") == 5 * BS  # the new epoch is believed
    finally:
        new.close()


def test_a_worker_that_stops_publishing_is_forgotten_when_its_claims_expire(url, router):
    w = Worker(url, "w0", interval_s=0.1, ttl_s=0.5)
    w.prefill(HASHES)
    w.publisher.flush()
    assert router.locate().local_tokens("w0") == FULL
    w.publisher._stop.set()  # the process dies: no more writes, no drop
    w.publisher._thread.join()
    time.sleep(0.7)
    assert router.locate().local_tokens("w0") == 0
    w.publisher.index.close()


def test_an_idle_publisher_keeps_its_claims_alive(url, router):
    publisher = CachePublisher(StoreIndex(url), "w0", interval_s=0.05, ttl_s=0.5)
    try:
        publisher.on_event(_stored(HASHES))
        time.sleep(1.2)  # past two TTLs with no new event: the beats refreshed it
        assert router.locate().local_tokens("w0") == FULL
    finally:
        publisher.close()


def test_redis_down_falls_back_to_the_estimate_and_back_resyncs(redis_server, router):
    w = Worker(redis_server.url, "w0")
    try:
        w.prefill(HASHES[:6])
        w.publisher.flush()
        for w_id in ("w0", "w1"):  # the estimate the router keeps from its routing
            router.loc.routed(w_id, HASHES)
        got = router.locate()
        assert got.local_tokens("w0") == 6 * BS  # published: exact, whatever was routed
        assert got.local_tokens("w1") == FULL  # published nothing: the estimate
        redis_server.kill()
        got = router.locate()  # no exception: the routing estimate for every worker
        assert got.local_tokens("w0") == got.local_tokens("w1") == FULL
        assert router.loc.errors == 1
        w.prefill(HASHES[6:8])
        assert w.publisher.flush() == "down"
        redis_server.start()  # empty: nothing of w0 is there
        time.sleep(0.3)  # past both retry windows
        assert w.publisher.flush() == "ok"  # the whole mirror, rewritten
        assert router.locate().local_tokens("w0") == 8 * BS
    finally:
        w.close()


def test_publish_modes_guard_the_owner(url):
    index = StoreIndex(url)
    try:
        h = [b"a" * 16, b"b" * 16]
        assert index.publish_cache("wx", "e1", "delta", h, [], 5000) == "missing"
        assert index.publish_cache("wx", "e1", "start", h, [], 5000) == "ok"
        assert index.publish_cache("wx", "e2", "delta", [], h, 5000) == "taken"
        assert index.publish_cache("wx", "e2", "resync", [], [], 5000) == "taken"
        assert index.publish_cache("wx", "e2", "drop", [], [], 5000) == "taken"
        assert index.publish_cache("wx", "e1", "delta", [], h[:1], 5000) == "ok"
        assert index._redis.hkeys(worker_cache_key("pdkv", "wx")) == [b"epoch", h[1]]
        assert index.publish_cache("wx", "e1", "drop", [], [], 5000) == "ok"
        assert not index._redis.exists(worker_cache_key("pdkv", "wx"))
        with pytest.raises(ValueError, match="mode"):
            index.publish_cache("wx", "e1", "bogus", [], [], 5000)
    finally:
        index.close()


def _stored(hashes):
    from pdserve.engine.kv_cache.prefix_cache import CacheEvent, CacheEventKind

    return CacheEvent(CacheEventKind.STORED, tuple(hashes))


def test_a_large_cache_is_written_in_chunks(url, router, monkeypatch):
    import pdserve.kv_store.cache_events as ce

    monkeypatch.setattr(ce, "CHUNK", 3)
    w = Worker(url, "w0", num_blocks=32)
    try:
        w.prefill(HASHES)  # 10 blocks: 4 calls
        assert w.publisher.flush() == "ok"
        assert router.locate().local_tokens("w0") == FULL
        w.blocks.reset_prefix_cache()
        assert w.publisher.flush() == "ok"
        assert router.locate().local_tokens("w0") == 0
    finally:
        w.close()
