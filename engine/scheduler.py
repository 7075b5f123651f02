"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first, in arrival order (a decoding sequence costs one token,
a sequence mid-prefill its next chunk), then waiting sequences are admitted while the token
budget, the sequence limit and free blocks allow. When blocks run out the newest running
sequence is preempted (its blocks freed, recomputed later — its full blocks usually come
back from the prefix cache). It knows nothing of models or transports: a KV connector's
scheduler half (engine/kv_connector.py) says which tokens come from elsewhere, which
blocks to save, and when a finished request's blocks may be freed.

Solo prefills (`SchedulerConfig.solo_prefill_tokens`): when sequences decode and prompts
wait (or a running prompt's last chunk is due) that all finish within that many tokens, the
step runs those prompts alone and the decode rows in the next step. Where a step is
compute-bound (a CPU), each decode row in a prompt's step delays the prompt's first token
by about a row of compute; alone, the first token comes that much sooner, and the rows lose
once what a separate step costs over sharing one. Never two solo steps in a row, so a
decode row waits at most one solo step; a longer prompt's earlier chunks share steps with
the rows as before. Only steps scheduled without `max_running` (not pipelined ones).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache.block_hash import ROOT_HASH, BlockHash, hash_block, hash_blocks
from pdserve.engine.kv_cache.block_manager import BlockManager, OutOfBlocksError
from pdserve.engine.kv_connector import (
    KVConnectorScheduler,
    LoadSpec,
    NoKVConnector,
    StepTransfers,
)
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

    Invariants: a sequence is in exactly one of `waiting`, `running`, `held` (finished, its
    blocks kept while the connector still transfers them) or none (finished, blocks freed);
    a running sequence holds blocks for at least its computed tokens; after `abort` its
    blocks are back in the block manager. A sequence in flight (the engine marks it while
    a step over it is submitted and not collected) is running and keeps its blocks: it is
    neither scheduled nor preempted, and the engine defers its abort until the step lands.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        max_model_len: int,
        compat_key: str,
        connector: KVConnectorScheduler | None = None,
    ):
        self.config = config
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_model_len = max_model_len
        self.compat_key = compat_key
        self.connector = connector or NoKVConnector()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # Computed tokens whose KV a preemption dropped: recomputed when the sequence runs
        # again, except what the prefix cache still holds by then.
        self.num_preempted_tokens = 0
        self._loads: list[LoadSpec] = []  # admitted this step with tokens from elsewhere
        self.num_solo_steps = 0
        self._solo_last = False  # the last step ran prompts alone (the next one may not)

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

    def reserve(self, num_tokens: int, token_ids: list[int] | None = None
                ) -> tuple[list[int], list[BlockHash]]:
        """Blocks for the first `num_tokens` tokens of a request whose KV comes from
        elsewhere: the cached prefix of `token_ids` (when given) first, then fresh blocks
        (consecutive ids where the pool allows: a transfer into them is one region per
        layer). Returns (block ids, hashes of the cached ones). Raises OutOfBlocksError
        and takes nothing when the pool cannot hold them now."""
        hashes = self.prefix_hashes(token_ids) if token_ids is not None else []
        cached = self.blocks.match_prefix(hashes)
        need = blocks_for(num_tokens, self.block_size) - len(cached)
        if not self.blocks.can_allocate(need):
            self.blocks.free(reversed(cached))
            raise OutOfBlocksError(f"{need} blocks needed for {num_tokens} tokens, "
                                   f"{self.blocks.num_free_blocks} free")
        return cached + self.blocks.allocate_contiguous(need), hashes[: len(cached)]

    def adopt(self, seq: Sequence, block_ids: list[int], cached: list[BlockHash]) -> None:
        """Join a sequence whose KV is in `block_ids`: the cached prefix (`cached`, its
        hashes) and, after it, what the connector says was loaded from elsewhere. Raises
        RuntimeError, changing nothing, unless that covers all its tokens (the prompt, and
        the output tokens of a resumed request)."""
        local = len(cached) * self.block_size
        external = self.connector.num_external_tokens(seq, local)
        if local + external != seq.num_tokens:
            raise RuntimeError(
                f"request {seq.request_id}: KV incomplete ({local} cached + {external} "
                f"loaded of {seq.num_tokens} tokens)"
            )
        seq.block_ids, seq.block_hashes = list(block_ids), list(cached)
        seq.num_computed_tokens = seq.num_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.commit_full_blocks(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self, max_running: int | None = None) -> list[ScheduledSeq]:
        """The next step: running sequences first (at most `max_running` of them when
        given), then admissions. A running sequence in flight (`seq.in_flight`: a step of
        it still runs in a pipeline) is skipped and never preempted; a step over the
        others may run beside it. Without `max_running`, short prompts may run alone
        (module docstring, "solo prefills")."""
        if max_running is None:
            solo = self._solo_prefills()
            self._solo_last = bool(solo)
            if solo:
                self.num_solo_steps += 1
                return solo
        budget = self.config.max_num_batched_tokens
        limit = len(self.running) if max_running is None else max_running
        out: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0 and len(out) < limit:
            seq = self.running[i]
            if seq.in_flight:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n):
                # The newest sequence not in flight: seq itself or one after it (then seq
                # is retried with the freed blocks; else self.running[i] is the next one).
                victim = next(s for s in reversed(self.running) if not s.in_flight)
                self._preempt(victim)
                continue
            out.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        self._admit(out, budget)
        return out

    def _solo_prefills(self) -> list[ScheduledSeq]:
        """The prompts of a solo step, or [] when this step should not be one: no limit,
        the last step was solo, nothing decodes (every step is then prompts only anyway),
        or a running prompt's next chunk would not finish it within the limit."""
        limit = min(self.config.solo_prefill_tokens or 0, self.config.max_num_batched_tokens)
        if limit <= 0 or self._solo_last:
            return []
        left = [(s, s.num_tokens - s.num_computed_tokens)
                for s in self.running if not s.in_flight]
        if not any(n == 1 for _, n in left) or (
                not self.waiting and all(n == 1 for _, n in left)):
            return []
        out: list[ScheduledSeq] = []
        budget = limit
        for seq, n in left:  # prompts mid-prefill: their last chunk, or no solo step
            if n > 1:
                if n > budget or not self._reserve(seq, n):
                    return []
                out.append(ScheduledSeq(seq, n))
                budget -= n
        self._admit(out, budget, whole=True)
        return out

    def _admit(self, out: list[ScheduledSeq], budget: int, whole: bool = False) -> None:
        """Admit waiting sequences in order while the token budget, `max_num_seqs` and free
        blocks allow, appending their chunks to `out`. `whole`: only while each one's
        prompt finishes within the budget (the first that does not stays waiting)."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            matched_now = not seq.block_ids
            external = 0
            if matched_now:
                self._match_prefix(seq)
                external = self._external_tokens(seq)
            left = seq.num_tokens - seq.num_computed_tokens
            n = min(left, budget)
            if (whole and n < left) or not self._reserve(seq, n):
                if matched_now:
                    # Give the matched prefix back: a waiting request that kept blocks it
                    # cannot use could starve the running ones, or deadlock with them once
                    # every running request has been preempted. They stay cached (evictable).
                    self._reset_to_waiting(seq)
                break
            self.waiting.popleft()
            if external:
                self._loads.append(LoadSpec(seq.request_id, tuple(seq.block_ids),
                                            seq.num_computed_tokens - external, external))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n

    def build_step(self, batch: list[ScheduledSeq]) -> StepTransfers:
        """The KV connector's work for the step `schedule()` just returned."""
        loads, self._loads = self._loads, []
        return self.connector.build_step(batch, loads)

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
        if self.connector.request_finished(seq):
            self.release(seq)
        else:
            self.held[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is, held ones included; its blocks are freed. None
        if unknown."""
        seq = self.held.get(request_id)
        if seq is not None:
            seq.finish_reason = FinishReason.ABORT
            self.connector.request_finished(seq)  # stops its transfers; True by contract
            self.release(seq)
            return seq
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def transfers_finished(self, request_ids: Iterable[str]) -> None:
        """Free the held blocks of requests whose transfers ended (the connector says so)."""
        for rid in request_ids:
            seq = self.held.get(rid)
            if seq is not None:
                self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Free a sequence's blocks (full ones stay in the prefix cache, evictable)."""
        self.held.pop(seq.request_id, None)
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
        self.num_preempted_tokens += seq.num_computed_tokens
        self._reset_to_waiting(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _reset_to_waiting(self, seq: Sequence) -> None:
        """Drop a sequence's blocks and computed state; it will be recomputed."""
        self.release(seq)
        seq.num_computed_tokens = 0
        seq.block_hashes = []
        seq.status = SequenceStatus.WAITING

    def _external_tokens(self, seq: Sequence) -> int:
        """Count tokens the connector provides as computed (their load is listed in this
        step's transfers once the sequence is admitted); never the last token, whose logits
        must be computed to sample."""
        local = seq.num_computed_tokens
        external = max(0, min(self.connector.num_external_tokens(seq, local),
                              seq.num_tokens - 1 - local))
        seq.num_computed_tokens += external
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens += external  # not computed here either (usage.cached_tokens)
        return external

    def prefix_hashes(self, token_ids: list[int]) -> list[BlockHash]:
        """Hashes of the full blocks of `token_ids` that a cached prefix may cover: never
        the block of the last token, whose logits must be computed to sample."""
        usable = (len(token_ids) - 1) // self.block_size * self.block_size
        return hash_blocks(token_ids[:usable], self.block_size, self.compat_key)

    def _match_prefix(self, seq: Sequence) -> None:
        hashes = self.prefix_hashes(seq.token_ids)
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
