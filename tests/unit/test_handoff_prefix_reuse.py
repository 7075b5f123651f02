"""Decode-side prefix reuse in a handoff, with plain workers (no Ray) on a small random-weight
model over the `local` and `grpc` transports: a decode worker that already holds a prompt's
prefix reserves and receives only the blocks after it, the tokens do not change, and every
path gives every block back on both sides.

The random model's logits are nearly flat, so a last-bit difference in the KV may change a
greedy token: the prefill worker runs without its own prefix cache, so it computes every
prompt in one pass and sends the same bytes each time. Token equality with HF on the real
model is tests/integration/test_decode_prefix_reuse.py's."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import pytest
from testkit import assert_worker_blocks_back, worker_handoff

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer import KVTransferError
from pdserve.messages import KVSink, WorkerRequest
from pdserve.prefill_worker.worker import PrefillWorker

BS = 8
# kv_transfer.wire reads protobuf bytes through torch.frombuffer, which warns once that the
# buffer is read-only (it is only read); test_kv_transfer.py filters it the same way.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")
PROMPT = [(7 * i + 3) % 500 + 5 for i in range(43)]  # 6 blocks, the last one partly filled
_ids = itertools.count()


@pytest.fixture(scope="module", params=["local", "grpc"])
def workers(request):
    config = EngineConfig(model="random:tiny", num_threads=1,
                          cache=CacheConfig(block_size=BS, num_blocks=48))
    p_config = replace(config, cache=replace(config.cache, enable_prefix_caching=False))
    p = PrefillWorker(p_config, transport=request.param, worker_id=f"p-reuse-{request.param}")
    d = DecodeWorker(config, transport=request.param, worker_id=f"d-reuse-{request.param}")
    yield p, d
    p.close()
    d.close()


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, seed=1)


def handoff(p: PrefillWorker, d: DecodeWorker, prompt: list[int], reuse: bool = True,
            params: SamplingParams | None = None) -> tuple[KVSink, list[int]]:
    return worker_handoff(p, d, f"reuse-{next(_ids)}", prompt, params or greedy(), reuse)


def sent_blocks(p: PrefillWorker, fn) -> int:
    before = p.stats().handoff_bytes
    fn()
    return (p.stats().handoff_bytes - before) // p.engine.layout.block_bytes


def test_second_request_with_the_same_prefix_moves_only_the_last_block(workers):
    p, d = workers
    out = {}
    n_cold = sent_blocks(p, lambda: out.update(cold=handoff(p, d, PROMPT)))
    n_warm = sent_blocks(p, lambda: out.update(warm=handoff(p, d, PROMPT)))
    (cold_sink, cold), (warm_sink, warm) = out["cold"], out["warm"]
    assert (cold_sink.first_block, len(cold_sink.block_ids), n_cold) == (0, 6, 6)
    # 42 of 43 tokens may come from D's cache, i.e. 5 full blocks: only the 6th travels.
    assert (warm_sink.first_block, len(warm_sink.block_ids), n_warm) == (5, 1, 1)
    assert len(cold) == 6 and warm == cold
    assert_worker_blocks_back(p, d)


def test_a_shared_head_is_reused_and_the_rest_is_sent(workers):
    p, d = workers
    out = {}
    handoff(p, d, PROMPT)
    other = PROMPT[:2 * BS] + [(11 * i) % 500 + 3 for i in range(20)]  # diverges in block 2
    n = sent_blocks(p, lambda: out.update(sink=handoff(p, d, other)[0]))
    assert (out["sink"].first_block, len(out["sink"].block_ids), n) == (2, 3, 3)
    assert_worker_blocks_back(p, d)


def test_without_the_prompt_the_decode_side_reserves_every_block(workers):
    p, d = workers
    handoff(p, d, PROMPT)
    sink, tokens = handoff(p, d, PROMPT, reuse=False)
    assert sink.first_block == 0 and len(sink.block_ids) == 6
    assert_worker_blocks_back(p, d)


def test_aborted_and_expired_reuse_reservations_give_every_block_back(workers):
    p, d = workers
    handoff(p, d, PROMPT)
    start = d.stats().free_blocks
    # Aborted before the prefill: the prefill is refused and frees its own blocks.
    rid = f"reuse-{next(_ids)}"
    request = WorkerRequest(rid, tuple(PROMPT), greedy())
    sink = d.reserve(rid, len(PROMPT), 6, prompt_token_ids=PROMPT)
    assert sink.first_block == 5 and d.stats().free_blocks == start - 6
    assert d.abort(rid)
    with pytest.raises(KVTransferError):
        p.prefill(request, sink)
    p.abort(rid)
    assert_worker_blocks_back(p, d)
    # A lease that runs out before anything arrived.
    rid = f"reuse-{next(_ids)}"
    d.reserve(rid, len(PROMPT), 6, lease_s=0.05, prompt_token_ids=PROMPT)
    deadline = time.monotonic() + 10
    while d.leases_expired == 0:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)
    assert_worker_blocks_back(p, d)
    # The prefix is still cached: the next request reuses it.
    sink, _ = handoff(p, d, PROMPT)
    assert sink.first_block == 5
    assert_worker_blocks_back(p, d)
