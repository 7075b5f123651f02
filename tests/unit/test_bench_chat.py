"""The chat and long-doc workloads: exact token ids, growing histories, shared prefixes."""

from __future__ import annotations

import json
import random

import pytest

from pdserve.bench.chat import chat_workload
from pdserve.bench.long_doc import long_doc_workload
from pdserve.bench.make_sharegpt_sample import DEFAULT_OUT
from pdserve.bench.sharegpt import exchanges, word_estimate
from pdserve.bench.text_tokens import ChatTokens, load_tokenizer
from pdserve.bench.workloads import RequestSpec, Workload, repeated_prefix_tokens

SAMPLE = str(DEFAULT_OUT)
CHATML = (  # SmolLM2's template, default system prompt and all
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A word-level tokenizer over the sample's words with ChatML specials: fast, exact."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from pdserve.engine.tokenizer import TextTokenizer

    pre = pre_tokenizers.Whitespace()
    words = {"[UNK]", "You", "are", "a", "helpful", "assistant", "system", "user", "Question",
             ":"}
    for entry in json.loads(DEFAULT_OUT.read_text()):
        for turn in entry["conversations"]:
            words.update(piece for piece, _ in pre.pre_tokenize_str(turn["value"]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(sorted(words))},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|im_start|>", "<|im_end|>")])
    return TextTokenizer(tok, CHATML, None, ())


def _tokens(tokenizer, seed=0) -> ChatTokens:
    return ChatTokens(tokenizer, random.Random(seed))


def _by_tag(workload: Workload) -> dict[str, RequestSpec]:
    return {spec.tag: spec for spec in workload.requests}


def _chat(tokenizer, **kw) -> Workload:
    args = dict(dataset=SAMPLE, num_users=4, turns=3, system_len=64, num_system_prompts=2,
                seed=0)
    args.update(kw)
    return chat_workload(tokens=_tokens(tokenizer, args["seed"]), **args)


def test_chat_turns_grow_and_each_extends_the_last(tiny_tokenizer):
    workload = _chat(tiny_tokenizer)
    tags = [spec.tag for spec in workload.requests]
    assert tags == [f"user{u}/turn{t}" for t in range(3) for u in range(4)]  # interleaved
    tokens = _tokens(tiny_tokenizer)
    replies = {tokens.encode(reply) for entry in json.loads(DEFAULT_OUT.read_text())
               for _, reply in exchanges(entry)}
    specs = _by_tag(workload)
    for spec in workload.requests:
        assert len(spec.prompt_token_ids) == spec.input_len
    for u in range(4):
        for t in range(2):
            before, after = specs[f"user{u}/turn{t}"], specs[f"user{u}/turn{t + 1}"]
            assert after.prompt_token_ids[: before.input_len] == before.prompt_token_ids
            # Next in the history: the dataset's reply, as long as the output asked for.
            reply = after.prompt_token_ids[before.input_len:][: before.output_len]
            assert reply in replies and before.output_len == len(reply)
            assert after.input_len > before.input_len + before.output_len


def test_chat_users_share_system_prompts_round_robin(tiny_tokenizer):
    specs = _by_tag(_chat(tiny_tokenizer))
    tokens = _tokens(tiny_tokenizer)
    framing = len(tokens.prompt([("system", ())], generation_prompt=False))
    head = framing + 64  # the framed system message: exactly --system-len content tokens

    def system(u: int):
        return specs[f"user{u}/turn0"].prompt_token_ids[:head]

    assert system(0) == system(2) and system(1) == system(3) and system(0) != system(1)
    # The system message ends there: each user's own turn follows it.
    assert specs["user0/turn0"].prompt_token_ids[head:] != specs["user2/turn0"].prompt_token_ids[
        head:]


def test_chat_is_reproducible_for_a_seed(tiny_tokenizer):
    first = _chat(tiny_tokenizer, seed=5).requests
    assert first == _chat(tiny_tokenizer, seed=5).requests
    other = _chat(tiny_tokenizer, seed=6).requests
    assert [s.prompt_token_ids for s in first] != [s.prompt_token_ids for s in other]
    # A new seed, new system prompts: no prompt of one seed shares a block with the other's.
    assert not {s.prompt_token_ids[:16] for s in first} & {s.prompt_token_ids[:16] for s in other}


def test_chat_output_lengths_clamped_and_max_len_ends_chats(tiny_tokenizer):
    clamped = _chat(tiny_tokenizer, output_len=(5, 7))
    assert {s.output_len for s in clamped.requests} <= {5, 6, 7}
    full = _chat(tiny_tokenizer)
    limit = sorted(s.input_len + s.output_len for s in full.requests)[6]
    cut = _chat(tiny_tokenizer, max_len=limit)
    assert 0 < len(cut.requests) < len(full.requests)
    assert all(s.input_len + s.output_len <= limit for s in cut.requests)
    assert "left out" in cut.note
    for spec in cut.requests:  # what is left is the same chats, ended early
        assert spec in full.requests
    with pytest.raises(ValueError, match="no chat turn fits --max-len 60"):
        _chat(tiny_tokenizer, max_len=60)


@pytest.mark.parametrize(("kw", "message"), [
    ({"num_system_prompts": 0}, "--num-system-prompts must be between 1 and --num-users"),
    ({"num_system_prompts": 5}, "--num-system-prompts must be between 1 and --num-users"),
    ({"system_len": -1}, "--system-len must be >= 0"),
    ({"num_users": 0}, "--num-users and --turns >= 1"),
    ({"turns": 0}, "--num-users and --turns >= 1"),
    ({"dataset": "/nonexistent/set.json"}, "dataset file not found"),
])
def test_chat_bad_arguments(tiny_tokenizer, kw, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _chat(tiny_tokenizer, **kw)


def test_chat_without_a_tokenizer_sends_random_ids_of_estimated_length():
    workload = _chat(None, num_users=2, turns=2, system_len=32, num_system_prompts=1)
    specs = _by_tag(workload)
    assert all(1000 <= i < 30000 for s in workload.requests for i in s.prompt_token_ids)
    assert specs["user0/turn0"].prompt_token_ids[:32] == specs["user1/turn0"].prompt_token_ids[
        :32]
    before, after = specs["user0/turn0"], specs["user0/turn1"]
    assert after.prompt_token_ids[: before.input_len] == before.prompt_token_ids


def _long_doc(tokenizer, **kw) -> Workload:
    args = dict(dataset=SAMPLE, num_docs=3, questions_per_doc=3, doc_len=(200, 200),
                question_len=(8, 12), output_len=(4, 6), seed=0)
    args.update(kw)
    return long_doc_workload(tokens=_tokens(tokenizer, args["seed"]), **args)


def test_long_doc_questions_share_their_document(tiny_tokenizer):
    workload = _long_doc(tiny_tokenizer)
    assert [s.tag for s in workload.requests] == [f"doc{d}/q{q}" for q in range(3)
                                                  for d in range(3)]
    tokens = _tokens(tiny_tokenizer)
    framing = len(tokens.prompt([("user", ())], generation_prompt=False)) - 2  # before content
    cue = tokens.encode("\n\nQuestion: ")
    after_cue = len(tokens.prompt([("user", ())])) - framing  # framing after the question
    specs = _by_tag(workload)
    for d in range(3):
        prompts = [specs[f"doc{d}/q{q}"].prompt_token_ids for q in range(3)]
        shared = framing + 200 + len(cue)
        assert len({p[:shared] for p in prompts}) == 1  # document and cue, exactly
        assert len({p[shared:] for p in prompts}) == 3  # the questions differ
        for p in prompts:
            assert 8 <= len(p) - shared - after_cue <= 12
    docs = {specs[f"doc{d}/q0"].prompt_token_ids[framing: framing + 16] for d in range(3)}
    assert len(docs) == 3  # documents differ from their first block on
    assert all(len(s.prompt_token_ids) == s.input_len for s in workload.requests)
    assert all(4 <= s.output_len <= 6 for s in workload.requests)
    assert workload.requests == _long_doc(tiny_tokenizer).requests
    assert workload.requests != _long_doc(tiny_tokenizer, seed=1).requests


def test_long_doc_bad_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match="exceeds --max-len 150"):
        _long_doc(tiny_tokenizer, max_len=150)
    with pytest.raises(ValueError, match="--num-docs 999 is more than"):
        _long_doc(tiny_tokenizer, num_docs=999)
    with pytest.raises(ValueError, match="--num-docs and --questions-per-doc >= 1"):
        _long_doc(tiny_tokenizer, questions_per_doc=0)


def test_long_doc_without_a_tokenizer_has_exact_lengths():
    workload = _long_doc(None, doc_len=(100, 100))
    specs = _by_tag(workload)
    docs = [specs[f"doc0/q{q}"].prompt_token_ids for q in range(3)]
    # The document, then the cue ("Question:", one estimated token), then the question.
    assert len({p[:101] for p in docs}) == 1 and len({p[:102] for p in docs}) == 3
    assert all(101 + 8 <= s.input_len <= 101 + 12 for s in workload.requests)


def test_repeated_prefix_tokens_counts_the_longest_earlier_prefix():
    prompts = [(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3, 4, 6), (9,), (1, 2, 3, 4)]
    # Matches 0, 3, 4, 0, 4; in blocks of 2: 0, 2, 4, 0, 4.
    assert repeated_prefix_tokens(prompts, 2) == (11, 10)
    assert repeated_prefix_tokens([], 16) == (0, 0)


def test_describe_states_the_repeated_share(tiny_tokenizer):
    workload = _long_doc(tiny_tokenizer)
    exact, whole = repeated_prefix_tokens([s.prompt_token_ids for s in workload.requests], 16)
    total = sum(s.input_len for s in workload.requests)
    text = workload.describe()
    assert f"prefix cache or KV store can skip): {exact} ({100 * exact / total:.1f}%)" in text
    assert f"in whole 16-token blocks {whole}" in text
    messages = Workload("m", [RequestSpec(4, 3, messages=(("user", "hi"),))])
    assert "repeating" not in messages.describe()  # no ids, nothing to count


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        load_tokenizer("no-such-model")


def test_framed_ids_equal_the_routers_tokenization_of_the_messages():
    """SmolLM2's real tokenizer and template: what the chat workload sends is what the
    router makes of the same messages (and no token merges across a message boundary)."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokens = ChatTokens(tokenizer)
    entries = json.loads(DEFAULT_OUT.read_text())
    long_ones = [pairs for e in entries if len(pairs := exchanges(e)) > 1][:4]
    for pairs in long_ones:
        for system in (None, "You are terse.\n\n" + pairs[0][1]):
            messages = [("system", system)] if system else []
            for ask, reply in pairs:
                messages.append(("user", ask))
                ids = tokens.prompt([(role, tokens.encode(text)) for role, text in messages])
                rendered = tokenizer.apply_chat_template(
                    [{"role": role, "content": text} for role, text in messages])
                assert ids == tuple(tokenizer.encode(rendered))
                messages.append(("assistant", reply))
    assert word_estimate("a b") == 3  # the no-tokenizer estimate the other tests rely on
