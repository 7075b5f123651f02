"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first, in arrival order (a decoding sequence costs one token,
a sequence mid-prefill its next chunk), then waiting sequences are admitted while the token
budget, the sequence limit and free blocks allow. When blocks run out the newest running
sequence is preempted (its blocks freed, recomputed later — its full blocks usually come
back from the prefix cache). Worker kinds specialise this class; it knows nothing of
models or transports.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache.block_hash import ROOT_HASH, hash_block, hash_blocks
from pdserve.engine.kv_cache.block_manager import BlockManager
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from pdserve.messages import blocks_for


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's end, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    """Decides which tokens of which sequences run in the next model step.

    Invariants: a sequence is in exactly one of `waiting`, `running` or neither (finished);
    a running sequence holds blocks for at least its computed tokens; after `abort` or
    finish (unless `hold_blocks_on_finish`) its blocks are back in the block manager.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        max_model_len: int,
        compat_key: str,
        hold_blocks_on_finish: bool = False,
    ):
        self.config = config
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_model_len = max_model_len
        self.compat_key = compat_key
        self.hold_blocks_on_finish = hold_blocks_on_finish
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError if a request can never be served by this engine."""
        if num_prompt_tokens < 1:
            raise ValueError("prompt is empty: at least one token is needed")
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds the model's context length of {self.max_model_len}"
            )
        need = blocks_for(total, self.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks for {total} tokens but the pool has only "
                f"{self.blocks.num_blocks}; raise the KV memory budget"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.params.max_tokens)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in its blocks (a handed-off request)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    continue  # seq is now waiting; self.running[i] is the next one
                continue  # retry seq with the freed blocks
            out.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            matched_now = not seq.block_ids
            if matched_now:
                self._match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n):
                if matched_now:
                    # Give the matched prefix back: a waiting request that kept blocks it
                    # cannot use could starve the running ones, or deadlock with them once
                    # every running request has been preempted. They stay cached (evictable).
                    self._reset_to_waiting(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def postprocess(self, scheduled: Iterable[ScheduledSeq]) -> None:
        """Advance computed counts and publish hashes of blocks that became full."""
        for item in scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.commit_full_blocks(seq)

    def append_token(self, seq: Sequence, token_id: int, eos_token_ids: tuple[int, ...]) -> bool:
        """Add a sampled token; finish the sequence on eos/stop id/length. Returns finished."""
        seq.token_ids.append(token_id)
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in eos_token_ids):
                self.finish(seq, FinishReason.STOP)
                return True
        if n_out >= p.max_tokens:
            self.finish(seq, FinishReason.LENGTH)
            return True
        return False

    # ---- ending ----------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._remove(seq)
        if not self.hold_blocks_on_finish or reason is FinishReason.ABORT:
            self.release(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is; its blocks are freed. None if unknown."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def release(self, seq: Sequence) -> None:
        """Free a sequence's blocks (called later by workers that hold them on finish)."""
        if seq.block_ids:
            # Tail first: freed blocks become evictable in this order, so under memory
            # pressure a cached prefix loses its last blocks before its first ones, and
            # what remains is still a matchable prefix.
            self.blocks.free(reversed(seq.block_ids))
            seq.block_ids = []

    # ---- internals -------------------------------------------------------------------------

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        need = blocks_for(seq.num_computed_tokens + n, self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        seq.block_ids.extend(self.blocks.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._reset_to_waiting(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _reset_to_waiting(self, seq: Sequence) -> None:
        """Drop a sequence's blocks and computed state; it will be recomputed."""
        self.release(seq)
        seq.num_computed_tokens = 0
        seq.block_hashes = []
        seq.status = SequenceStatus.WAITING

    def _match_prefix(self, seq: Sequence) -> None:
        # Never match the last token: its logits must be computed to sample.
        usable = (seq.num_tokens - 1) // self.block_size * self.block_size
        hashes = hash_blocks(seq.token_ids[:usable], self.block_size, self.compat_key)
        matched = self.blocks.match_prefix(hashes)
        seq.block_ids = matched
        seq.block_hashes = hashes[: len(matched)]
        seq.num_computed_tokens = len(matched) * self.block_size
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash and publish every full block whose KV is computed (idempotent)."""
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            h = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], self.compat_key)
            seq.block_hashes.append(h)
            self.blocks.commit_hash(seq.block_ids[i], h)
