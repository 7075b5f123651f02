"""What crosses from the driver rank to every rank for one model step, and back.

`StepInput` is the scheduled batch reduced to what a rank needs to run the model on it:
the new token ids, where each sequence's new tokens start, the blocks that hold each
sequence's context, and which sequences sample. It holds no sequence objects, so a follower
rank (which runs no scheduler) can rebuild the very same step from plain data: it crosses
processes as msgpack bytes (`to_plain` / `from_plain`), never pickled.

Invariants: all per-sequence lists have one entry per scheduled sequence, in batch order;
`sum(query_lens) == len(token_ids)`; `block_tables[i]` covers the first
`context_lens[i] + query_lens[i]` tokens of sequence i (exactly `ceil(that / block_size)`
block ids); block ids mean the same blocks on every rank (each rank's pool has the same
number of blocks and holds its own KV heads / layers of them). `kv` is what the driver's KV
connector tells the follower ranks' connectors about this step's transfers
(`KVConnectorScheduler.rank_metadata`: plain data), None when no follower moves KV.
`micro_batches` is how many micro-batches a pipeline runs the step as (0: one a stage);
every rank must split a step alike, so it crosses with the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.scheduler import ScheduledSeq
from pdserve.messages import blocks_for


@dataclass(slots=True)
class StepInput:
    token_ids: list[int]  # the new tokens of every sequence, concatenated in batch order
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens already in the cache per sequence (= first position)
    block_tables: list[list[int]]  # blocks holding each sequence's context after this step
    samples: list[bool]  # whether the sequence's last new token is sampled this step
    kv: list | None = None  # the follower ranks' part of this step's KV transfers
    micro_batches: int = 0  # how many a pipeline splits the step into; 0: pp_size

    @classmethod
    def from_batch(cls, batch: Sequence[ScheduledSeq], block_size: int,
                   kv: list | None = None, micro_batches: int = 0) -> StepInput:
        ids: list[int] = []
        qlens: list[int] = []
        starts: list[int] = []
        tables: list[list[int]] = []
        samples: list[bool] = []
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            qlens.append(n)
            starts.append(start)
            tables.append(seq.block_ids[: blocks_for(start + n, block_size)])
            samples.append(item.samples)
        return cls(ids, qlens, starts, tables, samples, kv, micro_batches)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def split(self, n: int) -> list[StepInput]:
        """The step as `n` micro-batches of consecutive sequences (as even as possible),
        in batch order; what a pipeline keeps in flight at once. Each part keeps the
        invariants; `kv` stays with the whole step."""
        n = max(1, min(n, self.num_seqs))
        base, extra = divmod(self.num_seqs, n)
        parts, seq, tok = [], 0, 0
        for i in range(n):
            k = base + (i < extra)
            ntok = sum(self.query_lens[seq:seq + k])
            parts.append(StepInput(self.token_ids[tok:tok + ntok], self.query_lens[seq:seq + k],
                                   self.context_lens[seq:seq + k],
                                   self.block_tables[seq:seq + k], self.samples[seq:seq + k]))
            seq, tok = seq + k, tok + ntok
        return parts

    def to_plain(self) -> list:
        """Plain lists of ints and bools (msgpack-ready), in field order."""
        return [self.token_ids, self.query_lens, self.context_lens, self.block_tables,
                self.samples, self.kv, self.micro_batches]

    @classmethod
    def from_plain(cls, plain: list) -> StepInput:
        """Rebuild from `to_plain` output, refusing anything that breaks the invariants."""
        if not isinstance(plain, list) or len(plain) != 7:
            raise ValueError("a step input is a list of 7 fields")
        ids, qlens, starts, tables, samples, kv, micro_batches = plain
        if kv is not None and not isinstance(kv, list):
            raise ValueError("a step input's kv part is a list or None")
        if not isinstance(micro_batches, int) or micro_batches < 0:
            raise ValueError(f"a step input's micro-batch count is {micro_batches!r}")
        n = len(qlens)
        if not (len(starts) == len(tables) == len(samples) == n) or sum(qlens) != len(ids):
            raise ValueError(f"inconsistent step input: {n} sequences, {len(ids)} tokens")
        return cls(list(ids), list(qlens), list(starts), [list(t) for t in tables],
                   [bool(s) for s in samples], kv, micro_batches)


@dataclass(slots=True)
class StepOutput:
    """What the driver gets back from one step.

    `logits`: fp32 `[number of sampling sequences, vocab]`, full vocabulary (TP shards
    gathered), in batch order; valid until the next step (CUDA graphs reuse one buffer).
    """

    logits: torch.Tensor
