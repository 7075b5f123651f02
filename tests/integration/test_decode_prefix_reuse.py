"""Decode-side prefix reuse in a handoff, on the real SmolLM2 model with plain
`PrefillWorker` and `DecodeWorker` (no Ray) over real loopback gRPC and the `local`
transport: a decode worker that already holds a prompt's prefix reserves and receives only
the blocks after it, and its greedy tokens equal the first run's and HF transformers'.
Every block comes back on both sides, after commits and after aborts."""

from __future__ import annotations

import itertools

import pytest
from testkit import assert_worker_blocks_back, hf_greedy, worker_handoff

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer import KVTransferError
from pdserve.messages import KVSink, WorkerRequest, blocks_for
from pdserve.prefill_worker.worker import PrefillWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BS = 16
_ids = itertools.count()


@pytest.fixture(scope="module", params=["grpc", "local"])
def workers(request):
    config = EngineConfig(model="smollm2-135m-instruct",
                          cache=CacheConfig(block_size=BS, num_blocks=64))
    p = PrefillWorker(config, transport=request.param, worker_id=f"p-dreuse-{request.param}")
    d = DecodeWorker(config, transport=request.param, worker_id=f"d-dreuse-{request.param}")
    yield p, d
    p.close()
    d.close()


FACTS = ("Here is a list of facts about the sea. It covers most of the planet, it is salty, "
         "it has tides that follow the moon, and it is home to whales, fish and coral. ")


def chat(p: PrefillWorker, question: str) -> list[int]:
    return p.engine.tokenize([{"role": "user", "content": FACTS + question}])


@pytest.fixture(scope="module")
def prompt(workers) -> list[int]:
    """A long chat prompt: several full blocks and a partly filled last one."""
    ids = chat(workers[0], "Using these facts, write one short sentence about the sea.")
    assert len(ids) > 4 * BS and len(ids) % BS, len(ids)
    return ids


def handoff(p: PrefillWorker, d: DecodeWorker, prompt: list[int], n: int = 8
            ) -> tuple[KVSink, list[int], int]:
    """A plain-worker handoff offering the prompt for prefix reuse; returns (D's sink, the
    greedy tokens, how many blocks P sent)."""
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, seed=3)
    sent = p.stats().handoff_bytes
    sink, tokens = worker_handoff(p, d, f"dreuse-{next(_ids)}", prompt, sp)
    return sink, tokens, (p.stats().handoff_bytes - sent) // p.engine.layout.block_bytes


def test_second_request_reserves_and_receives_fewer_blocks_same_tokens(workers, prompt,
                                                                       hf_model):
    p, d = workers
    n_blocks = blocks_for(len(prompt), BS)
    cold_sink, cold, cold_sent = handoff(p, d, prompt)
    assert (cold_sink.first_block, len(cold_sink.block_ids), cold_sent) == \
        (0, n_blocks, n_blocks)
    warm_sink, warm, warm_sent = handoff(p, d, prompt)
    # Every full block came from D's own cache: only the partly filled last one travelled.
    assert (warm_sink.first_block, len(warm_sink.block_ids), warm_sent) == \
        (n_blocks - 1, 1, 1)
    assert warm == cold == hf_greedy(hf_model, prompt, 8)
    assert_worker_blocks_back(p, d)


def test_prompt_sharing_a_head_reuses_it_and_matches_hf(workers, prompt, hf_model):
    p, d = workers
    handoff(p, d, prompt)
    other = chat(p, "Which animals live in it? Answer in one line.")
    common = next(i for i, (a, b) in enumerate(zip(prompt, other)) if a != b)
    sink, tokens, sent = handoff(p, d, other)
    assert sink.first_block == common // BS >= 2
    assert sent == len(sink.block_ids) == blocks_for(len(other), BS) - common // BS
    assert tokens == hf_greedy(hf_model, other, 8)
    assert_worker_blocks_back(p, d)


def test_aborts_after_a_reuse_reservation_give_every_block_back(workers, prompt):
    p, d = workers
    handoff(p, d, prompt)
    # Decode side aborts before the prefill: P's push is refused, P frees its copy.
    rid = f"dreuse-{next(_ids)}"
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    request = WorkerRequest(rid, tuple(prompt), sp)
    sink = d.reserve(rid, len(prompt), 4, prompt_token_ids=prompt)
    assert sink.first_block > 0
    assert d.abort(rid)
    with pytest.raises(KVTransferError):
        p.prefill(request, sink)
    p.abort(rid)
    assert_worker_blocks_back(p, d)
    # Both sides abort after the push arrived, before the commit.
    rid = f"dreuse-{next(_ids)}"
    request = WorkerRequest(rid, tuple(prompt), sp)
    sink = d.reserve(rid, len(prompt), 4, prompt_token_ids=prompt)
    p.prefill(request, sink)
    p.abort(rid)  # its push is done: nothing to stop, its copy is freed
    assert d.abort(rid)
    assert_worker_blocks_back(p, d)
