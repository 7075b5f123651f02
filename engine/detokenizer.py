"""Incremental detokenisation and stop-string detection for one sequence.

Decoding a token alone can be wrong (byte-level BPE splits multi-byte characters, and some
tokenizers merge spaces differently at a boundary), so each step decodes a short window that
starts a few tokens back and emits only what is new. Text ending in U+FFFD (an incomplete
UTF-8 sequence) is held back until the next token completes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.sequence import Sequence
from pdserve.engine.tokenizer import TextTokenizer


@dataclass(slots=True)
class _Window:
    prefix_offset: int = 0
    read_offset: int = 0


class Detokenizer:
    """Turns each sequence's new output tokens into text and finds stop strings."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self._windows: dict[str, _Window] = {}

    def update(self, seq: Sequence, skip_last: bool = False) -> int | None:
        """Extend `seq.output_text` with its new tokens.

        `skip_last` leaves the newest token out of the text: the caller sets it when that
        token ended the request by id (EOS or a stop token id), whose text is not part of
        the output (as in vLLM; stop strings are likewise cut off).

        Returns the index in `output_text` where a stop string starts (the caller finishes
        the sequence and truncates there), or None.
        """
        win = self._windows.setdefault(seq.request_id, _Window())
        out = seq.output_token_ids
        if skip_last:
            out = out[:-1]
        prefix = self.tokenizer.decode(out[win.prefix_offset : win.read_offset])
        full = self.tokenizer.decode(out[win.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            # The next window starts at the tokens just emitted: their text is known, so
            # the decoder sees real left context at the boundary.
            win.prefix_offset = win.read_offset
            win.read_offset = len(out)
            start = max(len(seq.output_text) - _longest(seq.params.stop) + 1, 0)
            seq.output_text += new
            for stop in seq.params.stop:
                idx = seq.output_text.find(stop, start)
                if idx != -1:
                    return idx
        return None

    def emittable_text(self, seq: Sequence, finished: bool) -> str:
        """Text not yet streamed, holding back a possible partial stop string."""
        end = len(seq.output_text)
        if not finished and seq.params.stop:
            end = max(end - (_longest(seq.params.stop) - 1), seq.num_emitted_chars)
        text = seq.output_text[seq.num_emitted_chars : end]
        seq.num_emitted_chars = end
        return text

    def forget(self, request_id: str) -> None:
        self._windows.pop(request_id, None)


def _longest(stops) -> int:
    return max((len(s) for s in stops), default=1)
