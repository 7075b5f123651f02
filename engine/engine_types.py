"""What the engine hands its callers: a request's step output, a KV reservation, a load view.

Plain values, separate from `engine/llm_engine.py` so workers and transports can name them
without the engine's machinery; `pdserve.engine.llm_engine` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.sequence import TokenLogprob


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step (deltas), plus totals when it finishes."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
    """Blocks an engine set aside for a request whose prompt KV will be written from
    elsewhere. `block_ids` hold tokens `[0, num_tokens)` in order; the first
    `first_new_block` of them are this engine's cached prefix (already written), the rest
    (`new_block_ids`) are fresh and must be written before `adopt`."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    first_new_block: int
    block_size: int

    @property
    def new_block_ids(self) -> tuple[int, ...]:
        return self.block_ids[self.first_new_block:]

    @property
    def num_cached_tokens(self) -> int:
        return self.first_new_block * self.block_size


@dataclass(frozen=True, slots=True)
class EngineUsage:
    """A read-only view of an engine's load: safe to take from any thread (plain counts
    read without the engine thread, so at most one step stale)."""

    free_blocks: int  # free or evictable (cached, unused)
    total_blocks: int
    block_size: int
    running: int
    waiting: int
    reserved: int  # reservations not adopted yet
    held: int  # finished requests whose blocks a transfer still reads
    preemptions: int = 0  # running requests evicted for blocks (since start)
    preempted_tokens: int = 0  # computed tokens those evictions dropped (to recompute)
    solo_steps: int = 0  # steps that ran short prompts without the decode rows (since start)
