"""The first token streamed as soon as the prefill returns (before the decode commit).

Plain `PrefillWorker` and `DecodeWorker` (no Ray) with the real model and the `local`
transport: the prefill worker's `first_chunk` must be exactly the decode stream's first
token and text, and the router's splice (`_first_chunk_early`) must give the client the
same tokens, text and logprobs as the decode stream alone. Blocks come back on both sides.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.messages import OutputChunk, WorkerRequest
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.router.lifecycle import _first_chunk_early

MODEL = "smollm2-135m-instruct"
_ids = itertools.count()


@pytest.fixture(scope="module")
def workers():
    config = EngineConfig(model=MODEL, cache=CacheConfig(num_blocks=64))
    p = PrefillWorker(config, transport="local", worker_id="p-early")
    d = DecodeWorker(config, transport="local", worker_id="d-early")
    yield p, d
    p.close()
    d.close()


def handoff(p: PrefillWorker, d: DecodeWorker, prompt: list[int], **params):
    """Reserve on D, prefill on P; returns (request, first)."""
    rid = f"early-{next(_ids)}"
    sp = SamplingParams(seed=7, **params)
    request = WorkerRequest(rid, tuple(prompt), sp)
    sink = d.reserve(rid, len(prompt), sp.max_tokens)
    return request, p.prefill(request, sink)


def assert_blocks_back(p: PrefillWorker, d: DecodeWorker) -> None:
    """Every block free on both sides (cached prefix blocks count as free). P frees its copy
    on its loop thread after the transfer's ack, so poll briefly."""
    free = (p.stats().total_blocks, d.stats().total_blocks)
    deadline = time.monotonic() + 10
    while (now := (p.stats().free_blocks, d.stats().free_blocks)) != free:
        assert time.monotonic() < deadline, f"free blocks {now}, expected {free}"
        time.sleep(0.01)


def spliced(early: OutputChunk, chunks: list[OutputChunk]) -> list[OutputChunk]:
    async def source():
        for c in chunks:
            yield c

    async def collect():
        return [c async for c in _first_chunk_early(early, source(), "r")]

    return asyncio.run(collect())


def joined(chunks: list[OutputChunk]) -> tuple[list[int], str, list]:
    return ([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
            [lp for c in chunks for lp in c.logprobs])


@pytest.mark.parametrize("params", [
    dict(temperature=0.0, max_tokens=12),
    dict(temperature=0.8, top_p=0.9, max_tokens=9, logprobs=3),
])
def test_first_chunk_is_the_decode_streams_first_token(workers, params):
    p, d = workers
    prompt = p.engine.tokenize([{"role": "user", "content": "Write one sentence about the sea."}])
    request, first = handoff(p, d, prompt, **params)
    assert first.first_chunk is not None, first
    early = first.first_chunk
    assert list(early.token_ids) == [first.token_id] and not early.finished
    assert early.text == p.engine.tokenizer.decode([first.token_id])
    chunks = list(d.generate_from_prefill(request, first))
    assert chunks[0].token_ids[0] == first.token_id
    assert chunks[0].text.startswith(early.text)
    out = spliced(early, chunks)
    assert out[0] is early
    assert joined(out) == joined(chunks)  # the client sees the same request, token for token
    assert len(joined(out)[0]) == params["max_tokens"]
    if params.get("logprobs"):
        assert len(early.logprobs) == 1 and len(early.logprobs[0].top) == 3
    assert_blocks_back(p, d)


@pytest.mark.parametrize("params", [
    dict(temperature=0.0, max_tokens=1),  # the first token ends it: D reports the finish
    dict(temperature=0.0, max_tokens=8, stop=["sea"]),  # D owns stop strings
])
def test_no_first_chunk_when_the_decode_side_may_change_it(workers, params):
    p, d = workers
    prompt = p.engine.tokenize([{"role": "user", "content": "Name a colour."}])
    request, first = handoff(p, d, prompt, **params)
    assert first.first_chunk is None
    chunks = list(d.generate_from_prefill(request, first))
    assert chunks[-1].finished
    assert_blocks_back(p, d)


def test_no_first_chunk_when_the_first_token_ends_the_request(workers):
    """A first token that is a stop token id finishes the request on D: not sent early."""
    p, d = workers
    prompt = p.engine.tokenize([{"role": "user", "content": "Say hello."}])
    probe_req, probe = handoff(p, d, prompt, temperature=0.0, max_tokens=4)
    list(d.generate_from_prefill(probe_req, probe))
    request, first = handoff(p, d, prompt, temperature=0.0, max_tokens=4,
                             stop_token_ids=[probe.token_id])
    assert first.token_id == probe.token_id and first.first_chunk is None
    chunks = list(d.generate_from_prefill(request, first))
    assert chunks[-1].finished and chunks[-1].finish_reason == "stop"
    assert_blocks_back(p, d)


def test_a_decode_stream_that_disagrees_is_an_error():
    early = OutputChunk(token_ids=(5,), text="a")
    with pytest.raises(RuntimeError, match="does not start with the first token"):
        spliced(early, [OutputChunk(token_ids=(6,), text="b", finished=True,
                                    finish_reason="length")])
