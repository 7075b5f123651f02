"""The ``file`` workload: prompts and reply lengths from a ShareGPT-format JSON file.

The file is a list of ``{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``. Each entry gives one request: its first human turn
followed by a gpt turn. The human turn is sent as a single user message (``messages``, so the
server applies the model's chat template, as a chat client would); the gpt turn's length is
the output length to ask for.

Lengths are counted with a ``tokenizers`` tokenizer.json when one is given, and otherwise
estimated as whitespace-separated words x 1.3 (a typical English BPE ratio). Either way the
true prompt length comes back in the server's ``Usage.prompt_tokens`` and is what the
throughput figures use.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from pdserve.bench.workloads import RequestSpec, Workload, cycle_to

WORDS_TO_TOKENS = 1.3
_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "chatgpt", "bard", "model"}


def word_estimate(text: str) -> int:
    """Estimated token count: whitespace words x 1.3, at least 1."""
    return max(1, round(len(text.split()) * WORDS_TO_TOKENS))


def tokenizer_counter(path: str) -> Callable[[str], int]:
    """A token counter backed by a local ``tokenizer.json`` or a model's own tokenizer (an
    embedded model name, a ``.gguf`` file, an HF directory); never downloaded."""
    from pdserve.bench.text_tokens import load_tokenizer  # imports this module

    tokenizer = load_tokenizer(path)
    return lambda text: max(1, len(tokenizer.encode(text)))


def exchanges(entry: object) -> list[tuple[str, str]]:
    """Every (human, gpt) pair of adjacent turns in an entry, in order; [] if there is none.

    A turn of another kind (system, tool) or an empty value ends the pair it would be part
    of; the entry's later pairs still count.
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        return []
    turns = entry["conversations"]
    pairs = []
    for ask, answer in zip(turns, turns[1:], strict=False):
        if not (isinstance(ask, dict) and isinstance(answer, dict)):
            continue
        if ask.get("from") in _HUMAN and answer.get("from") in _GPT:
            prompt, reply = ask.get("value"), answer.get("value")
            if (
                isinstance(prompt, str)
                and isinstance(reply, str)
                and prompt.strip()
                and reply.strip()
            ):
                pairs.append((prompt, reply))
    return pairs


def first_exchange(entry: object) -> tuple[str, str] | None:
    """The first (human, gpt) pair of adjacent turns in an entry, or None if there is none."""
    pairs = exchanges(entry)
    return pairs[0] if pairs else None


def load_entries(path: str) -> list:
    """The entries of a ShareGPT-format JSON file (a list), with a clear error otherwise."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"dataset {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"dataset {path} must be a JSON list of ShareGPT entries")
    return data


def file_workload(
    path: str,
    num_requests: int | None,
    seed: int,
    tokenizer: str | None = None,
    max_len: int = 2048,
) -> Workload:
    """Requests from a ShareGPT file, shuffled with ``seed``.

    Entries with no human→gpt exchange, or whose estimated prompt + reply exceeds
    ``max_len``, are skipped. ``num_requests`` None takes every usable entry; more than
    there are repeats them from the start.
    """
    data = load_entries(path)
    count = tokenizer_counter(tokenizer) if tokenizer else word_estimate
    requests, skipped = [], 0
    for index, entry in enumerate(data):
        pair = first_exchange(entry)
        if pair is None:
            skipped += 1
            continue
        n_in, n_out = count(pair[0]), count(pair[1])
        if n_in + n_out > max_len:
            skipped += 1
            continue
        messages = (("user", pair[0]),)
        requests.append(RequestSpec(n_out, n_in, messages=messages, tag=f"entry{index}"))
    if not requests:
        raise ValueError(f"dataset {path} has no usable human/gpt exchange")
    random.Random(seed).shuffle(requests)
    method = f"tokenizer {tokenizer}" if tokenizer else "words x 1.3 (estimate)"
    note = (
        f"from {path}: {len(requests)} usable entries, {skipped} skipped; "
        f"lengths counted by {method}; prompts sent as chat messages"
    )
    if num_requests and num_requests > len(requests):
        note += f"; repeated from the start to make {num_requests} requests"
    chosen = cycle_to(requests, num_requests) if num_requests else requests
    return Workload("file", chosen, note=note)
