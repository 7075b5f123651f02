"""Two engines of the real SmolLM2 model on one node sharing the global KV store (real
redis-server, real shared-memory pool; no Ray): a prefix one engine computed is loaded by
the other, which prefills only the rest; eviction under a tiny pool. Tokens always equal HF
transformers' greedy output, and every engine's blocks are all free at the end. (Redis and
store-process faults are in test_cluster_kv_store.py, on a real cluster.)"""

from __future__ import annotations

import time

import pytest
from testkit import hf_greedy

from pdserve.engine.llm import engine_config
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_store.connector import StoreConnector
from pdserve.kv_store.index import StoreIndex
from pdserve.kv_store.node_store import NodeStore

BS = 8
SYSTEM = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman "
          "and his three daughters. Every morning")


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    """(store, engine A, engine B): one node's store and two workers on it."""
    shm = str(tmp_path_factory.mktemp("shm"))
    index = StoreIndex(redis_server.url, retry_s=0.2)
    engines = []
    for _ in range(2):
        conn = StoreConnector(StoreIndex(redis_server.url, retry_s=0.2), "node-e")
        cfg = engine_config(block_size=BS, num_blocks=48, max_num_batched_tokens=64,
                            max_num_seqs=8, num_threads=1)
        engines.append(LLMEngine(cfg, kv_connector=conn))
    shape = tuple(engines[0].kv_cache[:, :, 0].shape)
    store = NodeStore(index, "node-e", 64, shape, "float32", shm_dir=shm, lease_s=0.8)
    yield store, engines[0], engines[1]
    for e in engines:
        e.connector.close()
    store.close()
    index.close()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run(engine: LLMEngine, prompts: dict[str, list[int]], n: int, between=None,
        cached: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Serve `prompts` together to the end; then wait until the store saved their blocks.
    `cached` receives each request's reported cached (not computed) prompt tokens."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, greedy(n))
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            if o.finished and cached is not None:
                cached[o.request_id] = o.cached_tokens
        steps += 1
        if between is not None and steps == 1:
            between()
    deadline = time.monotonic() + 10
    while engine.scheduler.held:
        assert time.monotonic() < deadline, "saves did not finish"
        time.sleep(0.01)
        engine.release_finished_transfers()
    u = engine.usage()
    assert u.free_blocks == u.total_blocks and (u.running, u.waiting) == (0, 0)
    return out


def ids(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenize(text)


def test_prefix_computed_on_a_is_loaded_by_b_which_prefills_only_the_rest(cluster, hf_model):
    _, a, b = cluster
    first = ids(a, SYSTEM + " he walked down to the harbour and")
    second = ids(a, SYSTEM + " the youngest daughter sang a song about")
    assert run(a, {"a1": first}, 6)["a1"] == hf_greedy(hf_model, first, 6)
    shared = 0
    while first[shared] == second[shared]:
        shared += 1
    loaded = shared // BS * BS
    assert loaded >= 2 * BS
    before, hits = b.stats["prompt_tokens"], b.connector.counters.hit_tokens
    cached: dict[str, int] = {}
    assert run(b, {"b1": second}, 6, cached=cached)["b1"] == hf_greedy(hf_model, second, 6)
    assert b.connector.counters.hit_tokens - hits == loaded == cached["b1"]
    assert b.stats["prompt_tokens"] - before == len(second) - loaded  # only the suffix
    # The whole first prompt on B: every block A saved (prompt and output) is there.
    before = b.stats["prompt_tokens"]
    assert run(b, {"b2": first}, 6)["b2"] == hf_greedy(hf_model, first, 6)
    assert b.stats["prompt_tokens"] - before == len(first) - (len(first) - 1) // BS * BS


def test_eviction_under_a_tiny_pool_keeps_tokens_right_and_counts_consistent(
        cluster, hf_model, tmp_path):
    store, a, b = cluster
    tiny = NodeStore(store.index, "node-tiny", 6, store.pool.block_shape, "float32",
                     shm_dir=str(tmp_path), lease_s=0.8)
    a.connector.node = b.connector.node = "node-tiny"  # both workers now on the tiny node
    try:
        prompts = {f"q{i}": ids(a, f"{i}, {i + 1}, {i + 2}. {SYSTEM} the number {i} was")
                   for i in range(4)}
        for rid, p in prompts.items():  # each prompt ~5 blocks: the pool holds barely one
            assert run(a, {rid: p}, 3)[rid] == hf_greedy(hf_model, p, 3)
        got = run(b, {f"b-{rid}": p for rid, p in prompts.items()}, 3)
        for rid, p in prompts.items():
            assert got[f"b-{rid}"] == hf_greedy(hf_model, p, 3)
        s = tiny.stats()
        assert s.evictions > 0 and s.used_blocks <= s.capacity_blocks == 6
        assert s.puts - s.evictions == s.used_blocks and s.pinned_blocks == 0
    finally:
        a.connector.node = b.connector.node = store.node
        tiny.close()
