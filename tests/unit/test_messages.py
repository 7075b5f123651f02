"""Router <-> worker messages: each survives its plain form and JSON, refuses keys it does
not know or lacks, and chunks merge the way a client's stream reads them."""

from __future__ import annotations

import json
from dataclasses import fields
from types import SimpleNamespace

import pytest

from pdserve import kv_transfer
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer import base as kv_base
from pdserve.messages import (
    KVSink,
    MessageError,
    OutputChunk,
    PrefillResult,
    StorePoolStats,
    TokenLogprob,
    WorkerRequest,
    WorkerStats,
    blocks_for,
)

LP = TokenLogprob(11, -0.25, ((11, -0.25), (7, -1.5)))
CHUNK = OutputChunk((11, 12), "Hi there", (LP, TokenLogprob(12, -0.5)))
END = OutputChunk((13,), "!", (), True, "length", 9, 3, 4)

MESSAGES = [
    WorkerRequest("req-1", (1, 2, 3), SamplingParams(max_tokens=4, seed=2**64 - 1,
                                                     stop=("x",), stop_token_ids=(2,),
                                                     logprobs=2)),
    WorkerRequest("req-2", (1, 2), SamplingParams(max_tokens=4, seed=3), (7, 8), 5),
    KVSink("grpc", "127.0.0.1:4000", "req-1", (3, 4, 9), 40, "abc123", 1.7e9 + 0.25),
    LP,
    CHUNK,
    END,
    OutputChunk(),
    PrefillResult("req-1", 11, -0.25, ((11, -0.25), (7, -1.5)), "length", 16, CHUNK),
    PrefillResult("req-2", 5, None, (), "stop", 0, None),
    WorkerStats("prefill-0", "prefill", 10, 64, 1, 2, 300, 40, handoffs=3,
                handoff_seconds=0.5, handoff_bytes=1 << 20, handoff_tail_seconds=0.125,
                node="n1"),
    WorkerStats("decode-0", "decode", 60, 64, 0, 0, 0, 0, leases_expired=2, preemptions=3,
                preempted_tokens=120, solo_steps=4),
    WorkerStats("colocated-0", "colocated", 8, 64, 1, 0, 16, 2, store_hit_blocks=4,
                store_loaded_bytes=1 << 22, store_load_seconds=0.003),
    StorePoolStats("n1", "/dev/shm/pool", "cpu", True, 1 << 20, 512, 100, 2, 7, 300),
    StorePoolStats("n2", ""),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_through_plain_data_and_json(msg):
    plain = msg.to_dict()
    assert type(msg).from_dict(plain) == msg
    text = json.dumps(plain)  # only JSON types: no tuples of objects, no dataclasses
    assert json.loads(text) == plain
    assert type(msg).from_dict(json.loads(text)) == msg


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_unknown_and_missing_keys_are_refused(msg):
    cls = type(msg)
    with pytest.raises(ValueError, match="surprise"):
        cls.from_dict({**msg.to_dict(), "surprise": 1})
    for f in fields(cls):
        partial = {k: v for k, v in msg.to_dict().items() if k != f.name}
        with pytest.raises(ValueError, match=f.name):
            cls.from_dict(partial)


def test_nested_messages_are_checked_too():
    bad = MESSAGES[7].to_dict()
    bad["first_chunk"]["logprobs"][0]["extra"] = 0
    with pytest.raises(MessageError, match="TokenLogprob.*extra"):
        PrefillResult.from_dict(bad)
    req = MESSAGES[0].to_dict()
    req["params"]["temprature"] = 0.5
    with pytest.raises(ValueError, match="temprature"):
        WorkerRequest.from_dict(req)


def test_merge_joins_in_order_and_the_first_end_gives_the_totals():
    merged = OutputChunk.merge([CHUNK, OutputChunk((), "", ()), END])
    assert merged.token_ids == (11, 12, 13)
    assert merged.text == "Hi there!"
    assert merged.logprobs == CHUNK.logprobs
    assert merged.finished and merged.finish_reason == "length"
    assert (merged.prompt_tokens, merged.completion_tokens, merged.cached_tokens) == (9, 3, 4)
    # An abort queued after the real end does not rewrite the end.
    abort = OutputChunk(finished=True, finish_reason="abort", prompt_tokens=9)
    assert OutputChunk.merge([END, abort]).finish_reason == "length"


def test_merge_of_unfinished_chunks_stays_unfinished_and_nothing_is_empty():
    merged = OutputChunk.merge([CHUNK, OutputChunk((14,), " you")])
    assert not merged.finished and merged.finish_reason == "" and merged.prompt_tokens == 0
    assert merged.token_ids == (11, 12, 14) and merged.text == "Hi there you"
    assert OutputChunk.merge([]) == OutputChunk() and OutputChunk().empty
    assert not OutputChunk(text="a").empty and not OutputChunk.merge([END]).empty


def test_chunk_from_engine_output():
    """What the workers build from an engine `RequestOutput` (duck-typed here)."""
    out = SimpleNamespace(new_token_ids=[5, 6], new_text="ab",
                          new_logprobs=[SimpleNamespace(token_id=5, logprob=-1.0,
                                                        top=[(5, -1.0), (9, -2.0)])],
                          finished=True, finish_reason="stop", prompt_tokens=7,
                          completion_tokens=2, cached_tokens=0)
    chunk = OutputChunk.from_output(out)
    assert chunk == OutputChunk((5, 6), "ab", (TokenLogprob(5, -1.0, ((5, -1.0), (9, -2.0))),),
                                True, "stop", 7, 2, 0)
    running = OutputChunk.from_output(SimpleNamespace(**{**vars(out), "finished": False,
                                                         "finish_reason": None}))
    assert not running.finished and running.prompt_tokens == 0


def test_chunk_invariants():
    with pytest.raises(MessageError, match="finish_reason"):
        OutputChunk(finished=True)
    with pytest.raises(MessageError, match="finish_reason"):
        OutputChunk(finish_reason="stop")
    with pytest.raises(MessageError, match="token counts"):
        OutputChunk((1,), "a", prompt_tokens=3)


def test_blocks_for_is_ceil_division():
    assert [blocks_for(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert blocks_for(5, 1) == 5


def test_kv_sink_is_one_class_wherever_it_is_imported():
    assert kv_transfer.KVSink is kv_base.KVSink is KVSink
