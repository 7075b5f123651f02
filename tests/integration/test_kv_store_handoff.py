"""Decode-side reuse from the global KV store in a handoff, on the real model with plain
`PrefillWorker` and `DecodeWorker` (no Ray, `local` transport, real redis-server and pool):
a decode worker that lacks a prompt's prefix but finds it in the store reserves past it and
loads it itself, so the prefill worker sends only the rest; the prefill worker loads the
prefix from the store too and computes only the suffix. Tokens equal HF's greedy output."""

from __future__ import annotations

import time

import pytest
from testkit import assert_worker_blocks_back, hf_greedy, worker_handoff

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_store.connector import StoreConnector
from pdserve.kv_store.index import StoreIndex
from pdserve.kv_store.node_store import NodeStore
from pdserve.messages import WorkerRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BS = 16
STORY = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman and "
         "his three daughters. Every morning before the sun rose over the hills, the old man "
         "pushed his little blue boat into the water, and every evening")


@pytest.fixture(scope="module")
def workers(redis_server, tmp_path_factory):
    from pdserve.prefill_worker.worker import PrefillWorker

    config = EngineConfig(model="smollm2-135m-instruct",
                          cache=CacheConfig(block_size=BS, num_blocks=64))

    def store() -> StoreConnector:
        return StoreConnector(StoreIndex(redis_server.url, retry_s=0.2), "node-h")

    p = PrefillWorker(config, transport="local", worker_id="p-store", store=store())
    d = DecodeWorker(config, transport="local", worker_id="d-store", store=store())
    shape = tuple(d.engine.kv_cache[:, :, 0].shape)
    node = NodeStore(StoreIndex(redis_server.url), "node-h", 64, shape, "float32",
                     shm_dir=str(tmp_path_factory.mktemp("shm")))
    yield p, d
    p.close()
    d.close()
    node.close()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, seed=0)


def test_decode_worker_loads_the_stored_prefix_and_receives_only_the_rest(workers, hf_model):
    p, d = workers
    tok = d.engine.tokenizer
    first, second = tok.encode(STORY + " he sang."), tok.encode(STORY + " they cooked.")
    shared = next(i for i in range(len(first)) if first[i] != second[i]) // BS
    assert shared >= 2
    # D serves the first prompt itself (colocated path) and saves its blocks to the store.
    out = [t for c in d.generate(WorkerRequest("d-first", tuple(first), greedy(4)))
           for t in c.token_ids]
    assert out == hf_greedy(hf_model, first, 4)
    deadline = time.monotonic() + 10
    while d.stats().store_saved_blocks < len(first) // BS:
        assert time.monotonic() < deadline, "D's blocks were not saved"
        time.sleep(0.05)
    d.loop.call(lambda e: e.blocks.reset_prefix_cache())  # D forgets: only the store has it
    d_hits, p_hits = d.stats().store_hit_blocks, p.stats().store_hit_blocks
    p_tokens = p.stats().prompt_tokens

    sink, tokens = worker_handoff(p, d, "handoff", second, greedy(4))
    assert tokens == hf_greedy(hf_model, second, 4)
    assert sink.first_block == shared  # D loaded the shared blocks from the store
    assert d.stats().store_hit_blocks - d_hits == shared
    assert p.stats().store_hit_blocks - p_hits == shared  # and P did not compute them
    assert p.stats().prompt_tokens - p_tokens == len(second) - shared * BS
    assert_worker_blocks_back(p, d)
