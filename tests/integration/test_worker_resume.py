"""A resumed request (what the router sends when it migrates a request off a dead decode
worker) continues exactly where the client's stream stopped, on plain workers (no Ray) with
the real SmolLM2 model: the same token ids and the same text as an undisturbed run, joined
with no gap and no repeat, for greedy and seeded sampling, with a stop string whose text is
held back across the cut — colocated (`generate`) and after a new handoff of prompt plus
streamed tokens (`prefill` + `generate_from_prefill`). Every block comes back."""

from __future__ import annotations

import itertools

import pytest
from testkit import assert_worker_blocks_back

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.loader.registry import open_model
from pdserve.engine.sampling_params import SamplingParams
from pdserve.messages import OutputChunk, WorkerRequest
from pdserve.prefill_worker.worker import PrefillWorker

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

MODEL = "smollm2-135m-instruct"
PROMPT = "List three French cities with their accents, like Orléans:"
N = 14
_ids = itertools.count()


@pytest.fixture(scope="module")
def workers():
    config = EngineConfig(model=MODEL, num_threads=1,
                          cache=CacheConfig(block_size=8, num_blocks=64))
    p = PrefillWorker(config, transport="local", worker_id="p-resume")
    d = DecodeWorker(config, transport="local", worker_id="d-resume")
    yield p, d
    p.close()
    d.close()


@pytest.fixture(scope="module")
def prompt() -> tuple[int, ...]:
    return tuple(open_model(MODEL).tokenizer.encode(PROMPT))


def colocated(p, d, request: WorkerRequest) -> list[OutputChunk]:
    return list(d.generate(request))


def handed_off(p, d, request: WorkerRequest) -> list[OutputChunk]:
    tokens = list(request.all_token_ids)
    left = request.params.max_tokens - len(request.resumed_token_ids)
    sink = d.reserve(request.request_id, len(tokens), left, prompt_token_ids=tokens)
    first = p.prefill(request, sink)
    assert first.first_chunk is None or not request.resumed_token_ids
    chunks = list(d.generate_from_prefill(request, first))
    return chunks


def joined(chunks: list[OutputChunk]) -> tuple[list[int], str, str]:
    return ([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
            chunks[-1].finish_reason)


def cuts(chunks: list[OutputChunk]) -> list[int]:
    """After the first chunk, one in the middle and the last but one."""
    assert len(chunks) >= 4, "the stream came in too few chunks to cut"
    return sorted({1, len(chunks) // 2, len(chunks) - 1})


CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, seed=7),
    "seeded": SamplingParams(temperature=1.0, top_p=0.9, max_tokens=N, ignore_eos=True,
                             seed=1234),
}


@pytest.mark.parametrize("run", [colocated, handed_off], ids=["colocated", "handoff"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resumed_request_continues_the_stream_exactly(workers, prompt, run, case):
    p, d = workers
    params = CASES[case]
    whole = run(p, d, WorkerRequest(f"whole-{next(_ids)}", prompt, params))
    ids, text, reason = joined(whole)
    assert len(ids) == N and reason == "length"
    # Cut after chunk boundaries the client could have seen, as a migration would.
    for cut in cuts(whole):
        got_ids, got_text, _ = joined(whole[:cut])
        resumed = WorkerRequest(f"resumed-{next(_ids)}", prompt, params, tuple(got_ids),
                                len(got_text))
        rest_ids, rest_text, rest_reason = joined(run(p, d, resumed))
        assert got_ids + rest_ids == ids, f"cut after {len(got_ids)} tokens"
        assert got_text + rest_text == text, f"cut after {len(got_ids)} tokens"
        assert rest_reason == reason
    assert_worker_blocks_back(p, d)


@pytest.mark.parametrize("run", [colocated, handed_off], ids=["colocated", "handoff"])
def test_a_stop_string_across_the_cut_still_stops_with_the_same_text(workers, prompt, run):
    """The first worker held back the text that might start a stop string; the resumed one
    rebuilds it from the tokens, emits it if the stop does not come, and cuts at the stop
    as the undisturbed run does."""
    p, d = workers
    greedy = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, seed=1)
    ids, text, _ = joined(run(p, d, WorkerRequest(f"ref-{next(_ids)}", prompt, greedy)))
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, seed=1, stop=(stop,))
    whole = run(p, d, WorkerRequest(f"stop-{next(_ids)}", prompt, params))
    w_ids, w_text, w_reason = joined(whole)
    assert w_reason == "stop" and w_text == text[: text.find(stop)]
    for cut in cuts(whole):
        got_ids, got_text, _ = joined(whole[:cut])
        resumed = WorkerRequest(f"stop-resumed-{next(_ids)}", prompt, params,
                                tuple(got_ids), len(got_text))
        rest_ids, rest_text, rest_reason = joined(run(p, d, resumed))
        assert (got_ids + rest_ids, got_text + rest_text, rest_reason) == (w_ids, w_text,
                                                                             "stop")
    assert_worker_blocks_back(p, d)
