"""The ``chat`` workload: multi-turn conversations from a ShareGPT file, users sharing
system prompts, the context growing turn by turn.

User ``u`` holds one conversation of the dataset, taken turn by turn: turn ``t`` sends the
user's system prompt, the whole history so far (the dataset's human turns, and the dataset's
gpt replies as the assistant's), and the next human turn, and asks for as many tokens as the
dataset's reply has. The history holds the dataset's replies, not the server's, so no
request depends on an answer and the turns can follow any arrival process; the reply in the
history is cut to the output length asked for, so the context grows as it would have.

``num_system_prompts`` system prompts of exactly ``system_len`` tokens (dataset text,
shuffled with the seed: a long instruction-and-reference block) are shared round robin by
the users. A conversation with fewer exchanges than ``turns`` goes on with the next
conversation's (the bundled sample has one or two exchanges per entry; real ShareGPT
conversations are often long enough on their own).

Turns are interleaved across users (turn 0 of every user, then turn 1, ...), so a user's
turn ``t + 1`` is sent after its turn ``t``, ``num_users - 1`` requests later; under
``--concurrency`` below ``num_users`` turn ``t`` has then usually finished. Token ids are
sent (see ``text_tokens``).
"""

from __future__ import annotations

import itertools
import random

from pdserve.bench.sharegpt import exchanges, load_entries
from pdserve.bench.text_tokens import ChatTokens, Ids, take
from pdserve.bench.workloads import RequestSpec, Workload


def dataset_texts(entries: list, tokens: ChatTokens) -> list[Ids]:
    """The ids of every human and gpt turn of the usable exchanges, in file order."""
    texts = [tokens.encode(text) for entry in entries for pair in exchanges(entry)
             for text in pair]
    if not texts:
        raise ValueError("the dataset has no usable human/gpt exchange")
    return texts


def text_stream(texts: list[Ids], rng: random.Random, separator: Ids):
    """Endless dataset text: the texts in a seeded random order, reshuffled on each pass,
    ``separator`` between them."""
    order = list(range(len(texts)))
    while True:
        rng.shuffle(order)
        for k in order:
            yield texts[k] + separator


def system_prompts(count: int, length: int, texts: list[Ids], rng: random.Random,
                   separator: Ids) -> list[Ids]:
    """``count`` distinct prompts of exactly ``length`` ids, each from its own shuffle."""
    prompts = [take(text_stream(texts, rng, separator), length) for _ in range(count)]
    if len(set(prompts)) < count:
        raise ValueError(f"the dataset has too little text for {count} distinct system "
                         f"prompts of {length} tokens")
    return prompts


def user_exchanges(conversations: list[list[tuple[str, str]]], num_users: int, turns: int,
                   rng: random.Random) -> list[list[tuple[str, str]]]:
    """``turns`` exchanges per user: its own conversation, continued with the next ones."""
    order = list(range(len(conversations)))
    rng.shuffle(order)
    upcoming = itertools.cycle(order)
    users = []
    for _ in range(num_users):
        pairs: list[tuple[str, str]] = []
        while len(pairs) < turns:
            pairs += conversations[next(upcoming)]
        users.append(pairs[:turns])
    return users


def clamp(n: int, bounds: tuple[int, int] | None) -> int:
    """``n`` moved into the inclusive ``bounds`` (None: unchanged, at least 1)."""
    return max(1, n) if bounds is None else min(max(n, bounds[0]), bounds[1])


def interleave(per_user: list[list[RequestSpec]]) -> list[RequestSpec]:
    """Turn 0 of every user, then turn 1, ...; users with fewer turns drop out."""
    rounds = itertools.zip_longest(*per_user)
    return [spec for turn in rounds for spec in turn if spec is not None]


def chat_workload(
    dataset: str,
    num_users: int,
    turns: int,
    system_len: int,
    num_system_prompts: int,
    seed: int,
    tokens: ChatTokens,
    output_len: tuple[int, int] | None = None,
    max_len: int = 2048,
) -> Workload:
    """The chat workload; ``output_len`` None asks for each reply's own length, a range
    clamps it. A user's chat ends before the first turn whose prompt + output exceeds
    ``max_len``."""
    if num_users < 1 or turns < 1:
        raise ValueError(f"chat needs --num-users and --turns >= 1, got {num_users}, {turns}")
    if system_len < 0:
        raise ValueError(f"--system-len must be >= 0, got {system_len}")
    if not 1 <= num_system_prompts <= num_users:
        raise ValueError(f"--num-system-prompts must be between 1 and --num-users "
                         f"({num_users}), got {num_system_prompts}")
    entries = load_entries(dataset)
    conversations = [pairs for entry in entries if (pairs := exchanges(entry))]
    if not conversations:
        raise ValueError(f"dataset {dataset} has no usable human/gpt exchange")
    rng = random.Random(seed)
    systems = []
    if system_len:
        separator = tokens.encode("\n\n") if tokens.exact else ()
        systems = system_prompts(num_system_prompts, system_len,
                                 dataset_texts(entries, tokens), rng, separator)
    per_user, dropped = [], 0
    for u, pairs in enumerate(user_exchanges(conversations, num_users, turns, rng)):
        history: list[tuple[str, Ids]] = [("system", systems[u % len(systems)])] if systems else []
        specs: list[RequestSpec] = []
        for t, (ask, reply) in enumerate(pairs):
            history.append(("user", tokens.encode(ask)))
            ids = tokens.prompt(history)
            reply_ids = tokens.encode(reply)
            n_out = clamp(len(reply_ids), output_len)
            if len(ids) + n_out > max_len:
                dropped += len(pairs) - t
                break
            if specs and ids[: specs[-1].input_len] != specs[-1].prompt_token_ids:
                raise ValueError("the chat template does not extend turn t's prompt into "
                                 "turn t + 1's; use --tokenizer none or another model")
            specs.append(RequestSpec(n_out, len(ids), prompt_token_ids=ids,
                                     tag=f"user{u}/turn{t}"))
            history.append(("assistant", reply_ids[:n_out]))
        per_user.append(specs)
    requests = interleave(per_user)
    if not requests:
        raise ValueError(f"no chat turn fits --max-len {max_len}; raise it or lower "
                         f"--system-len")
    plural = "s" if len(systems) > 1 else ""
    shared = (f"{len(systems)} shared system prompt{plural} of {system_len} tokens" if systems
              else "no system prompt")
    note = f"{num_users} users x up to {turns} turns from {dataset}; {shared}"
    if dropped:
        note += f"; {dropped} turns past --max-len {max_len} left out"
    return Workload("chat", requests, note=note)
