"""Token ids for the text-derived workloads (``chat``, ``long-doc``): dataset text through a
model's tokenizer, framed by its chat template.

These workloads send token ids (``prompt_token_ids``), not chat messages. Messages would
let the server tokenize, and then the client could neither state exact lengths nor be sure
that turn ``t + 1`` of a chat starts with exactly the ids of turn ``t`` (a tokenizer may
merge across a boundary that moved). With ids fixed here, every prompt's length is exact,
the prefix that later turns share is exact by construction (and checked), and the share of
prompt tokens that repeat an earlier prompt (``Workload.describe``) is precisely what a
prefix cache or KV store can skip, so store hit rates can be read against it. The ids are
the ones the served model's own tokenizer and chat template give for the same messages
(``tests/unit/test_bench_chat.py`` checks this against the router's tokenization for
SmolLM2), so the server still sees a real conversation.

Without a tokenizer (``--tokenizer none``) text becomes seeded random ids, as many as its
estimated token count, with no framing: the synthetic workloads' convention.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.sharegpt import word_estimate

DEFAULT_TOKENIZER = "smollm2-135m-instruct"  # the model every CPU config serves
NO_TOKENIZER = "none"
_SLOT = "PDSERVEBENCHSLOT{}X"  # a placeholder no template changes and no text contains

Ids = tuple[int, ...]


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str):
    """A ``TextTokenizer`` from a ``tokenizer.json`` file, or a model (an embedded name such
    as ``smollm2-135m-instruct``, a ``.gguf`` file, an HF directory) as the router opens it.

    Cached: a sweep builds its workload once per rate, and parsing a GGUF header takes
    seconds. Raises FileNotFoundError or ValueError with a clear message.
    """
    from pdserve.engine.tokenizer import TextTokenizer

    if spec.endswith(".json"):
        from tokenizers import Tokenizer

        if not Path(spec).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {spec}")
        return TextTokenizer(Tokenizer.from_file(spec), None, None, ())
    from pdserve.engine.loader.model_files import open_tokenizer

    return open_tokenizer(spec)


class ChatTokens:
    """Text to ids, and chat messages (role, content ids) to one prompt's ids.

    Invariant: for messages ``m`` and any continuation ``m + more``, ``prompt(m)`` without
    its generation prompt is a prefix of ``prompt(m + more)``, and ``prompt(m)`` itself is a
    prefix of ``prompt(m + [assistant, ...])``. ``prompt`` raises ValueError when a chat
    template breaks this (the chat workload checks every turn against the one before).
    """

    def __init__(self, tokenizer=None, rng: random.Random | None = None,
                 vocab: tuple[int, int] = (1000, 30000)):
        self.tokenizer = tokenizer
        self._rng = rng or random.Random(0)
        self._vocab = vocab
        self._template = getattr(tokenizer, "chat_template", None) if tokenizer else None

    @property
    def exact(self) -> bool:
        """True when ids come from a tokenizer; False for random ids of estimated length."""
        return self.tokenizer is not None

    def encode(self, text: str) -> Ids:
        """The ids of ``text`` alone (no BOS), or random ids of its estimated length."""
        if self.tokenizer is None:
            lo, hi = self._vocab
            return tuple(self._rng.randrange(lo, hi) for _ in range(word_estimate(text)))
        return self._encode_piece(text)

    def prompt(self, messages: Sequence[tuple[str, Ids]], generation_prompt: bool = True) -> Ids:
        """The ids of a conversation: each message's content ids in its template framing,
        then (``generation_prompt``) the template's cue for the assistant to answer.

        The template is rendered with a placeholder for each content, and only the framing
        text between placeholders is tokenized; the contents are the given ids. For
        templates whose special tokens bound every message (ChatML, Llama 3) this equals
        tokenizing the rendered text. No template: the contents, concatenated.
        """
        if not self._template:
            return tuple(i for _, content in messages for i in content)
        slots = [_SLOT.format(k) for k in range(len(messages))]
        text = self.tokenizer.apply_chat_template(
            [{"role": role, "content": slot} for (role, _), slot in zip(messages, slots,
                                                                         strict=True)],
            add_generation_prompt=generation_prompt,
        )
        ids: list[int] = []
        if self.tokenizer.add_bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
        for slot, (_, content) in zip(slots, messages, strict=True):
            framing, found, text = text.partition(slot)
            if not found or slot in text:
                raise ValueError("the chat template must render each message's content once")
            ids += self._encode_piece(framing)
            ids += content
        ids += self._encode_piece(text)
        return tuple(ids)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - framing pieces repeat turn after turn
    def _encode_piece(self, text: str) -> Ids:
        ids = self.tokenizer.encode(text)
        if self.tokenizer.add_bos and ids[:1] == [self.tokenizer.bos_token_id]:
            ids = ids[1:]  # BOS starts the prompt only; encode() adds it to every piece
        return tuple(ids)


def take(stream, n: int) -> Ids:
    """The first ``n`` ids of the concatenation of the id tuples ``stream`` yields."""
    out: list[int] = []
    for ids in stream:
        out += ids[: n - len(out)]
        if len(out) == n:
            return tuple(out)
    raise ValueError(f"the text ran out before {n} tokens")
