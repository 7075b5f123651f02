"""Workloads: deterministic for a seed, lengths inside their ranges, prefixes really shared."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.make_sharegpt_sample import DEFAULT_OUT, make_sample
from pdserve.bench.sharegpt import file_workload, word_estimate
from pdserve.bench.workloads import parse_range, random_workload, shared_prefix_workload


def test_random_lengths_in_range_and_exact():
    workload = random_workload(200, (10, 20), (3, 5), seed=3, vocab=(100, 200))
    for spec in workload.requests:
        assert 10 <= spec.input_len <= 20 and 3 <= spec.output_len <= 5
        assert len(spec.prompt_token_ids) == spec.input_len
        assert all(100 <= t < 200 for t in spec.prompt_token_ids)
    # Both ends of the inclusive range are actually drawn.
    assert {s.input_len for s in workload.requests} >= {10, 20}
    total = sum(s.input_len for s in workload.requests)
    assert f"input tokens: total {total}," in workload.describe()


def test_random_is_deterministic_for_a_seed():
    same = random_workload(20, (5, 50), (1, 9), seed=11).requests
    assert same == random_workload(20, (5, 50), (1, 9), seed=11).requests
    assert same != random_workload(20, (5, 50), (1, 9), seed=12).requests


def test_shared_prefix_shares_prefixes_and_grows_chat_history():
    workload = shared_prefix_workload(
        num_prefixes=3,
        questions_per_prefix=4,
        prefix_len=(50, 50),
        question_len=(5, 8),
        output_len=(4, 4),
        num_chats=2,
        turns=3,
        seed=0,
    )
    specs = workload.requests
    assert len(specs) == 3 * 4 + 2 * 3
    singles = [s for s in specs if s.tag.startswith("prefix")]
    for p in range(3):
        group = [s.prompt_token_ids for s in singles if s.tag.startswith(f"prefix{p}/")]
        assert len(group) == 4 and len({ids[:50] for ids in group}) == 1
        assert len({ids[50:] for ids in group}) == 4  # the questions differ
    for c in range(2):
        turns = [s for s in specs if s.tag.startswith(f"chat{c}/")]
        assert [s.tag for s in turns] == [f"chat{c}/turn{t}" for t in range(3)]  # in order
        for before, after in zip(turns, turns[1:], strict=False):
            # The next turn resends the whole previous prompt, a reply, and a new question.
            assert after.prompt_token_ids[: before.input_len] == before.prompt_token_ids
            assert after.input_len >= before.input_len + 4 + 5
    assert (
        workload.requests
        == shared_prefix_workload(3, 4, (50, 50), (5, 8), (4, 4), 2, 3, 0).requests
    )


@pytest.mark.parametrize("text", ["0:5", "9:3", "x", "3:", ""])
def test_bad_ranges(text):
    with pytest.raises(ValueError, match="--len"):
        parse_range(text, "--len")


def test_good_ranges():
    assert parse_range("7", "n") == (7, 7) and parse_range("2:9", "n") == (2, 9)


def test_sample_file_is_the_scripts_deterministic_output():
    assert make_sample(120, 0) == make_sample(120, 0)
    assert json.loads(DEFAULT_OUT.read_text()) == make_sample(120, 0)
    assert DEFAULT_OUT.stat().st_size < 200_000


def test_file_workload_from_sample():
    workload = file_workload(str(DEFAULT_OUT), 30, seed=5)
    assert len(workload.requests) == 30
    entries = json.loads(DEFAULT_OUT.read_text())
    spec = workload.requests[0]
    entry = entries[int(spec.tag.removeprefix("entry"))]["conversations"]
    assert spec.messages == (("user", entry[0]["value"]),)
    assert spec.output_len == word_estimate(entry[1]["value"])
    assert workload.requests == file_workload(str(DEFAULT_OUT), 30, seed=5).requests
    assert workload.requests != file_workload(str(DEFAULT_OUT), 30, seed=6).requests


def test_file_workload_skips_unusable_and_too_long(tmp_path):
    data = [
        {
            "conversations": [
                {"from": "human", "value": "one two three"},
                {"from": "gpt", "value": "a b c d e f g h i j"},
            ]
        },
        {"conversations": [{"from": "gpt", "value": "no question first"}]},
        {
            "conversations": [
                {"from": "human", "value": "long " * 100},
                {"from": "gpt", "value": "x"},
            ]
        },
        "not even a dict",
    ]
    path = tmp_path / "set.json"
    path.write_text(json.dumps(data))
    workload = file_workload(str(path), None, seed=0, max_len=50)
    assert [s.tag for s in workload.requests] == ["entry0"]
    assert workload.requests[0].output_len == 13  # 10 words x 1.3
    assert "3 skipped" in workload.note
    assert len(file_workload(str(path), 3, seed=0, max_len=50).requests) == 3  # repeated


def test_file_workload_counts_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_path = tmp_path / "tokenizer.json"
    tokenizer.save(str(tok_path))
    data = [
        {
            "conversations": [
                {"from": "human", "value": "a a, a"},
                {"from": "gpt", "value": "a a a a a."},
            ]
        }
    ]
    path = tmp_path / "set.json"
    path.write_text(json.dumps(data))
    spec = file_workload(str(path), None, seed=0, tokenizer=str(tok_path)).requests[0]
    assert (spec.input_len, spec.output_len) == (4, 6)  # punctuation is its own token


def test_file_workload_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        file_workload(str(tmp_path / "missing.json"), 5, seed=0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        file_workload(str(bad), 5, seed=0)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="no usable"):
        file_workload(str(bad), 5, seed=0)
