"""What a user of `LLM.generate` notices on the real SmolLM2 model: reproducible seeds, stop
strings and ids, length limits, min_tokens, chat input, and clear errors that leave the
engine serving."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Reply with one word: yes or no?"}]


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def reference(llm):
    """One greedy continuation of PROMPT: the source of stop strings and stop ids."""
    (out,) = llm.generate(PROMPT, greedy())
    assert len(out.token_ids) == 24 and out.finish_reason == "length"
    return out


def assert_all_blocks_free(llm) -> None:
    blocks = llm.engine.blocks
    assert not llm.engine.has_unfinished()
    assert blocks.num_free_blocks == blocks.num_blocks


# --- seeds ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(llm):
    prompt = "Once upon a time, in a quiet village by the sea, there lived"  # > 1 block
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=10)
    (first,) = llm.generate(prompt, seeded)
    (second,) = llm.generate(prompt, seeded)
    assert second.cached_tokens > 0  # computed differently: its prefix came from the cache
    assert second.token_ids == first.token_ids
    batch = llm.generate(
        ["Write a haiku about the sea.", prompt, prompt, "1, 2, 3, 4," * 7],
        [
            SamplingParams(temperature=0.7, seed=1, max_tokens=6),
            seeded,
            SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=10),
            greedy(max_tokens=5),
        ],
    )
    assert batch[1].token_ids == first.token_ids
    assert batch[1].text == first.text
    # Another seed, same prompt and settings: a different continuation.
    assert batch[2].token_ids != first.token_ids
    assert_all_blocks_free(llm)


# --- stopping ------------------------------------------------------------------------------


def test_stop_string_truncates_text_and_stops(llm, reference):
    tok = llm.tokenizer
    ids = reference.token_ids
    text = tok.decode(ids)
    assert text == reference.text
    # A stop string that straddles two tokens in the second half of the output.
    ends = [len(tok.decode(ids[:j])) for j in range(len(ids) + 1)]
    k = next(
        j for j in range(len(ids) // 2, len(ids))
        if ends[j] > ends[j - 1] and ends[j + 1] > ends[j]
    )
    stop = text[ends[k] - 1 : ends[k] + 1]
    (out,) = llm.generate(PROMPT, greedy(stop=[stop, "never-in-output-xyz"]))
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert stop not in out.text
    assert out.token_ids == ids[: len(out.token_ids)]
    assert len(out.token_ids) <= k + 1  # generation ended where the stop string completed
    assert_all_blocks_free(llm)


def test_stop_token_id_ends_request_without_its_text(llm, reference):
    tok = llm.tokenizer
    ids = reference.token_ids
    # A visible token from the middle of the output (not whitespace, so its text matters).
    i = next(j for j in range(3, len(ids)) if tok.decode([ids[j]]).strip())
    stop_id = ids[i]
    first = ids.index(stop_id)
    (out,) = llm.generate(PROMPT, greedy(stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[: first + 1]  # the stop token is the last token id ...
    assert out.text == tok.decode(ids[:first])  # ... but its text is not in the output
    assert_all_blocks_free(llm)


def test_max_tokens_finishes_with_length(llm, reference):
    (out,) = llm.generate(PROMPT, greedy(max_tokens=3))
    assert out.finish_reason == "length"
    assert out.token_ids == reference.token_ids[:3]
    assert out.text == llm.tokenizer.decode(reference.token_ids[:3])


def test_min_tokens_suppresses_eos(llm):
    eos = llm.engine.model_config.eos_token_ids
    (short,) = llm.generate([CHAT], SamplingParams(temperature=0, max_tokens=8))
    assert short.finish_reason == "stop" and short.token_ids[-1] in eos
    n = len(short.token_ids)
    assert n < 6
    (longer,) = llm.generate([CHAT], SamplingParams(temperature=0, max_tokens=8, min_tokens=6))
    assert len(longer.token_ids) >= 6
    assert not set(longer.token_ids[:6]) & set(eos)
    assert longer.token_ids[: n - 1] == short.token_ids[:-1]  # same until eos was due
    assert_all_blocks_free(llm)


def test_chat_messages_use_the_chat_template(llm):
    (chat,) = llm.generate([CHAT], greedy(max_tokens=6))
    rendered = llm.tokenizer.apply_chat_template(CHAT)
    assert "yes or no" in rendered and rendered != CHAT[0]["content"]
    assert chat.prompt_token_ids == llm.tokenizer.encode(rendered)
    (plain,) = llm.generate(rendered, greedy(max_tokens=6))
    assert chat.token_ids == plain.token_ids
    assert chat.text.strip()


# --- bad input -----------------------------------------------------------------------------


def _context_overflow(llm):
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    max_tokens = llm.engine.max_model_len - n_prompt + 3
    with pytest.raises(ValueError) as e:
        llm.generate(PROMPT, SamplingParams(max_tokens=max_tokens))
    msg = str(e.value)
    for number in (n_prompt, max_tokens, llm.engine.max_model_len):
        assert str(number) in msg, msg


BAD_INPUTS = {
    "temperature<0": (lambda llm: llm.generate(PROMPT, SamplingParams(temperature=-0.5)),
                      ["temperature"]),
    "top_p=0": (lambda llm: llm.generate(PROMPT, SamplingParams(top_p=0.0)), ["top_p"]),
    "top_p>1": (lambda llm: llm.generate(PROMPT, SamplingParams(top_p=1.5)), ["top_p"]),
    "top_k<-1": (lambda llm: llm.generate(PROMPT, SamplingParams(top_k=-2)), ["top_k"]),
    "max_tokens<1": (lambda llm: llm.generate(PROMPT, SamplingParams(max_tokens=0)),
                     ["max_tokens"]),
    "empty text": (lambda llm: llm.generate(""), ["empty"]),
    "empty ids": (lambda llm: llm.generate([[]]), ["empty"]),
    "id beyond vocab": (lambda llm: llm.generate([[1, 2, 49152]]), ["49152", "vocab"]),
    "negative id": (lambda llm: llm.generate([[5, -1]]), ["-1", "vocab"]),
    "stop id beyond vocab": (
        lambda llm: llm.generate(PROMPT, SamplingParams(stop_token_ids=[10**6])),
        ["stop_token_ids", str(10**6)],
    ),
    "chat message without content": (lambda llm: llm.generate([[{"role": "user"}]]),
                                     ["content"]),
    "one bad prompt in a batch": (lambda llm: llm.generate(["fine", "", "also fine"]),
                                  ["empty"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_problem(llm, case):
    call, words = BAD_INPUTS[case]
    with pytest.raises(ValueError) as e:
        call(llm)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert_all_blocks_free(llm)  # nothing was queued


def test_prompt_plus_max_tokens_beyond_context_names_both_numbers(llm):
    _context_overflow(llm)
    assert_all_blocks_free(llm)


def test_unknown_model_name_lists_supported_models():
    with pytest.raises(ValueError) as e:
        LLM("no-such-model")
    assert "no-such-model" in str(e.value)
    assert "smollm2-135m-instruct" in str(e.value)


def test_engine_keeps_serving_after_bad_inputs(llm, reference):
    for call, _ in BAD_INPUTS.values():
        with pytest.raises(ValueError):
            call(llm)
    _context_overflow(llm)
    (out,) = llm.generate(PROMPT, greedy(max_tokens=8))
    assert out.token_ids == reference.token_ids[:8]
    assert out.finish_reason == "length"
    assert_all_blocks_free(llm)


# --- solo prefills -------------------------------------------------------------------------


def test_short_prompts_beside_decoding_ones_run_alone_with_the_same_tokens(llm):
    """Solo prefills (engine/scheduler.py): prompts that come while others decode get a step
    of their own (their first token without the rows' compute), and every request's greedy
    tokens are those it gets when prompts share the decode steps."""
    engine = llm.engine
    config = engine.scheduler.config
    first = ["The capital of France is", "List three colours:", "def fib(n):"]
    later = ["Water boils at", "The opposite of hot is"]

    def run(solo: int) -> tuple[dict[str, list[int]], list[str], int]:
        engine.scheduler.config = replace(config, solo_prefill_tokens=solo)
        tokens: dict[str, list[int]] = {}

        def collect(outputs) -> None:
            for out in outputs:
                tokens.setdefault(out.request_id.split("/")[1], []).extend(out.new_token_ids)

        for i, prompt in enumerate(first):
            engine.add_request(f"{solo}/a{i}", engine.tokenize(prompt), greedy(12))
        for _ in range(3):
            collect(engine.step())
        before = engine.scheduler.num_solo_steps
        for i, prompt in enumerate(later):
            engine.add_request(f"{solo}/b{i}", engine.tokenize(prompt), greedy(12))
        outputs = engine.step()
        collect(outputs)
        ran = sorted(out.request_id.split("/")[1] for out in outputs)  # who got a token
        while engine.has_unfinished():
            collect(engine.step())
        return tokens, ran, engine.scheduler.num_solo_steps - before

    try:
        solo_tokens, solo_ran, solo_steps = run(40)
        mixed_tokens, mixed_ran, mixed_steps = run(0)
    finally:
        engine.scheduler.config = config
    assert solo_ran == ["b0", "b1"] and solo_steps == 1
    assert engine.usage().solo_steps == engine.scheduler.num_solo_steps  # what stats report
    assert mixed_ran == ["a0", "a1", "a2", "b0", "b1"] and mixed_steps == 0
    assert solo_tokens == mixed_tokens
    assert all(len(t) == 12 for t in solo_tokens.values()) and len(solo_tokens) == 5
    assert_all_blocks_free(llm)
