"""One request's state inside an engine: its tokens, its blocks, how far it has computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdserve.engine.kv_cache.block_hash import BlockHash
from pdserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a request that another engine began stands (a migration): the output tokens
    it produced, in order, and how many characters of their text the client already has."""

    output_token_ids: tuple[int, ...]
    emitted_chars: int = 0


@dataclass(slots=True, eq=False)
class Sequence:
    """A request being served.

    Invariants: `num_computed_tokens <= len(token_ids)`; the KV of tokens
    `[0, num_computed_tokens)` is in the blocks `block_ids` (in order, `block_size` tokens
    each); `block_hashes[i]` is the chained hash of full block i and is only set once that
    block's KV is written.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # A step over this sequence is submitted and not collected yet (a pipeline holds
    # several steps at once): the scheduler neither schedules nor preempts it meanwhile.
    in_flight: bool = False
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # Detokenisation state (engine.detokenizer).
    output_text: str = ""
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """Still has prompt tokens whose KV is not computed."""
        return self.num_computed_tokens < self.num_prompt_tokens
