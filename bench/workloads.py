"""What the benchmark sends: synthetic ``random`` and ``shared-prefix`` workloads.

Both build prompts as token-id lists (sent as ``prompt_token_ids``), so every prompt has
exactly the length the workload states; the ids are drawn uniformly from ``vocab`` (by
default 1000..29999, clear of the special tokens most vocabularies keep at low ids and
inside every supported model's vocabulary). Token-id prompts skip the chat template, which
is what a length-controlled benchmark wants. The ``file`` workload lives in ``sharegpt``,
``chat`` in ``chat``, ``long-doc`` in ``long_doc``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_VOCAB = (1000, 30000)
CACHE_BLOCK = 16  # the block size of every shipped config: a cache reuses whole blocks


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send: exactly one of the three input forms is set."""

    output_len: int
    input_len: int  # exact for token ids; an estimate for text prompts
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    prompt: str | None = None
    tag: str = ""


@dataclass(slots=True)
class Workload:
    """A named list of requests, plus a note on how lengths were counted."""

    name: str
    requests: list[RequestSpec]
    note: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        """The realised totals, so nobody has to trust a range convention."""
        ins = [r.input_len for r in self.requests]
        outs = [r.output_len for r in self.requests]
        lines = [f"workload {self.name}: {len(self.requests)} requests"]
        for label, values in (("input tokens", ins), ("output tokens", outs)):
            if values:
                lines.append(
                    f"  {label}: total {sum(values)}, mean {sum(values) / len(values):.1f}, "
                    f"min {min(values)}, max {max(values)}"
                )
        prompts = [r.prompt_token_ids for r in self.requests]
        if prompts and all(p is not None for p in prompts):
            repeated, in_blocks = repeated_prefix_tokens(prompts, CACHE_BLOCK)
            total = max(1, sum(ins))
            lines.append(
                f"  prompt tokens repeating an earlier prompt's prefix (the most a prefix "
                f"cache or KV store can skip): {repeated} ({100 * repeated / total:.1f}%), "
                f"in whole {CACHE_BLOCK}-token blocks {in_blocks} "
                f"({100 * in_blocks / total:.1f}%)"
            )
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


def repeated_prefix_tokens(
    prompts: Iterable[Sequence[int]], block_size: int
) -> tuple[int, int]:
    """Summed over prompts in order: the length of the longest prefix each shares with any
    earlier prompt, and that length rounded down to whole ``block_size`` blocks.

    Prefixes are kept as chained hashes (one set entry per distinct prefix), so the cost is
    linear in the tokens; a false match needs a 64-bit collision.
    """
    seen: set[int] = set()
    exact = whole = 0
    for ids in prompts:
        h, match, matching, chain = 0, 0, True, []
        for i, token in enumerate(ids):
            h = hash((h, token))
            if matching and h in seen:
                match = i + 1
            else:
                matching = False
            chain.append(h)
        seen.update(chain)
        exact += match
        whole += match // block_size * block_size
    return exact, whole


def parse_range(text: str, name: str) -> tuple[int, int]:
    """``"128:512"`` → (128, 512) inclusive; ``"256"`` → (256, 256). Bad input → ValueError."""
    lo_text, sep, hi_text = text.partition(":")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise ValueError(f"{name} must be N or LO:HI with integers, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} must satisfy 1 <= LO <= HI, got {text!r}")
    return lo, hi


def cycle_to(requests: list[RequestSpec], n: int) -> list[RequestSpec]:
    """Exactly ``n`` requests: the list truncated, or repeated from its start if shorter."""
    if not requests:
        raise ValueError("the workload produced no requests")
    return [requests[i % len(requests)] for i in range(n)]


def _token_ids(rng: random.Random, n: int, vocab: tuple[int, int]) -> tuple[int, ...]:
    return tuple(rng.randrange(vocab[0], vocab[1]) for _ in range(n))


def random_workload(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    vocab: tuple[int, int] = DEFAULT_VOCAB,
) -> Workload:
    """Requests whose input and output lengths are uniform over the inclusive ranges."""
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        n_in = rng.randint(*input_len)
        n_out = rng.randint(*output_len)
        ids = _token_ids(rng, n_in, vocab)
        requests.append(RequestSpec(n_out, n_in, prompt_token_ids=ids, tag=f"random{i}"))
    return Workload("random", requests)


def _spread(base: list[RequestSpec], extra: list[RequestSpec]) -> list[RequestSpec]:
    """Interleave ``extra`` evenly through ``base``, keeping each list's own order."""
    if not base or not extra:
        return base + extra
    total = len(base) + len(extra)
    out, bi, ei = [], 0, 0
    for k in range(total):
        # Place an extra item whenever its share of the positions so far is behind.
        if ei < len(extra) and (bi >= len(base) or (ei + 1) * total <= (k + 1) * len(extra)):
            out.append(extra[ei])
            ei += 1
        else:
            out.append(base[bi])
            bi += 1
    return out


def shared_prefix_workload(
    num_prefixes: int,
    questions_per_prefix: int,
    prefix_len: tuple[int, int],
    question_len: tuple[int, int],
    output_len: tuple[int, int],
    num_chats: int,
    turns: int,
    seed: int,
    vocab: tuple[int, int] = DEFAULT_VOCAB,
) -> Workload:
    """Requests that share long prefixes: the case a KV store is for.

    Part one: ``num_prefixes`` long system prompts, each followed by ``questions_per_prefix``
    different questions, ordered question by question so each prefix is reused soon after
    it is first seen. Part two: ``num_chats`` multi-turn chats of ``turns`` turns; turn ``t``
    resends the chat's system prompt and the whole history (questions and replies) before a
    new question. The replies in that history are synthetic tokens of the requested output
    length, chosen up front so every request is independent of the server's answers and can
    follow any arrival process; a server can therefore reuse a chat's previous *prompt*, not
    its generated reply. Chat turns are interleaved across chats and spread through part one
    so that turn ``t + 1`` tends to arrive after turn ``t`` finished.
    """
    rng = random.Random(seed)
    prefixes = [_token_ids(rng, rng.randint(*prefix_len), vocab) for _ in range(num_prefixes)]
    singles = []
    for q in range(questions_per_prefix):
        for p, prefix in enumerate(prefixes):
            ids = prefix + _token_ids(rng, rng.randint(*question_len), vocab)
            n_out = rng.randint(*output_len)
            singles.append(
                RequestSpec(n_out, len(ids), prompt_token_ids=ids, tag=f"prefix{p}/q{q}")
            )
    histories = [prefixes[c % num_prefixes] if prefixes else () for c in range(num_chats)]
    chat_turns = []
    for t in range(turns):
        for c in range(num_chats):
            ids = histories[c] + _token_ids(rng, rng.randint(*question_len), vocab)
            n_out = rng.randint(*output_len)
            chat_turns.append(
                RequestSpec(n_out, len(ids), prompt_token_ids=ids, tag=f"chat{c}/turn{t}")
            )
            histories[c] = ids + _token_ids(rng, n_out, vocab)  # the synthetic reply
    note = (
        f"{num_prefixes} prefixes x {questions_per_prefix} questions + "
        f"{num_chats} chats x {turns} turns"
    )
    return Workload("shared-prefix", _spread(singles, chat_turns), note=note)
