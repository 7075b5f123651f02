"""The messages that cross between the router and the workers, and the block arithmetic.

Everything the router sends a worker, or a worker answers, is one of these small frozen
dataclasses: `WorkerRequest`, `KVSink` (a decode worker's reservation), `PrefillResult`,
`OutputChunk` (with `TokenLogprob`) and `WorkerStats`. Each converts to plain JSON types
with exactly one `to_dict` and back with exactly one `from_dict`, which refuses unknown and
missing keys; that plain data is what Ray (or any other carrier) moves, so no transport
between router and workers ever needs pickle of our objects (DESIGN.md, wire format).

This is a leaf module: it imports only the standard library and the (torch-free) sampling
parameters, so the router process, the workers and the engine may all import it.
`blocks_for` is the one place that says how many KV blocks hold a number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from pdserve.engine.sampling_params import SamplingParams


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many KV blocks of `block_size` slots hold `num_tokens` tokens (ceil division)."""
    return -(-num_tokens // block_size)


class MessageError(ValueError):
    """Plain data that is not a valid message: a key missing or unknown, a bad value."""


def _check_keys(cls: type, d: Any) -> None:
    """Refuse anything but a dict whose keys are exactly `cls`'s field names."""
    if not isinstance(d, dict):
        raise MessageError(f"{cls.__name__} must be a dict, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown, missing = sorted(set(d) - names), sorted(names - set(d))
    if unknown or missing:
        raise MessageError(f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}")


def _pairs(pairs: Iterable[Sequence]) -> tuple[tuple[int, float], ...]:
    return tuple((int(t), float(v)) for t, v in pairs)


def _set(obj: object, name: str, value: Any) -> None:
    # Normalising a frozen dataclass's own field in __post_init__.
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, slots=True)
class KVSink:
    """Where one request's KV goes: a decode worker's reservation, published to the sender.

    It crosses process boundaries inside Ray calls, so it converts to and from plain JSON
    types (`to_dict` / `from_dict`) and never needs pickle.

    Invariants: `num_tokens` counts the request's prompt tokens, all of them; the receiver
    already holds the KV of the first `first_block` blocks (a prefix it had cached), so
    those are not sent; `block_ids` are distinct decode-pool block ids for the request's
    blocks `first_block, first_block + 1, ...`, in that order, exactly
    `blocks_for(num_tokens, block_size) - first_block >= 1` of them; `deadline` is the lease
    expiry in unix seconds, after which the receiver may drop the reservation and reuse
    the blocks. `secret` is the reservation's capability, issued by the receiver at
    `expect`: the receiver admits a chunk for this request only with it, so whoever learns
    a request id still cannot write into its blocks. It travels only inside the sink (Ray
    calls) and the transfer; it is left out of `repr` so it never reaches a log line.
    A decode worker of several tensor-parallel ranks lists every rank's
    receiver in `rank_addresses`, in rank order (`rank_addresses[0] == address`): rank j
    holds KV heads `[j * H / n, (j + 1) * H / n)` of the model's H; each sending rank sends
    every receiving rank the heads both hold. Empty: one receiving rank, at `address`.
    Every rank's reservation admits the same secret. A decode worker of several pipeline
    stages also lists, in `rank_layers`, the model layer each rank's pool starts at
    (ranks stage-major, `rank_layers[0] == 0`; a rank holds its layers up to the next
    stage's first): the heads split over one stage's ranks, and each sending rank sends a
    receiving rank only the layers both hold. Empty: every rank holds every layer.
    """

    transport: str
    address: str
    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    compat_key: str  # the receiver's content key digest (`engine.config.ContentKey.digest`)
    deadline: float
    first_block: int = 0
    secret: str = field(default="", repr=False)
    rank_addresses: tuple[str, ...] = ()
    rank_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _set(self, "rank_addresses", tuple(self.rank_addresses))
        _set(self, "rank_layers", tuple(self.rank_layers))
        if self.rank_layers and (len(self.rank_layers) != len(self.rank_addresses)
                                 or self.rank_layers[0] != 0
                                 or list(self.rank_layers) != sorted(self.rank_layers)):
            raise ValueError("KVSink.rank_layers must give every rank's first layer, in "
                             f"stage-major rank order from 0; got {self.rank_layers}")
        if self.rank_addresses and self.rank_addresses[0] != self.address:
            raise ValueError("KVSink.rank_addresses must start with the sink's address")
        if not self.request_id:
            raise ValueError("KVSink.request_id must not be empty")
        if not self.block_ids:
            raise ValueError("KVSink.block_ids must not be empty")
        if len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError(f"KVSink.block_ids repeat a block: {self.block_ids}")
        if self.num_tokens < 1:
            raise ValueError(f"KVSink.num_tokens must be >= 1, got {self.num_tokens}")
        if self.first_block < 0:
            raise ValueError(f"KVSink.first_block must be >= 0, got {self.first_block}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_ids"] = list(self.block_ids)
        d["rank_addresses"] = list(self.rank_addresses)
        d["rank_layers"] = list(self.rank_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVSink:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"KVSink fields must be exactly {sorted(names)}, got {sorted(d)}")
        return cls(
            transport=str(d["transport"]),
            address=str(d["address"]),
            request_id=str(d["request_id"]),
            block_ids=tuple(int(b) for b in d["block_ids"]),
            num_tokens=int(d["num_tokens"]),
            compat_key=str(d["compat_key"]),
            deadline=float(d["deadline"]),
            first_block=int(d["first_block"]),
            secret=str(d["secret"]),
            rank_addresses=tuple(str(a) for a in d["rank_addresses"]),
            rank_layers=tuple(int(n) for n in d["rank_layers"]),
        )


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    """One request as the router hands it to a worker: already tokenised and validated.

    Invariants: `request_id` is not empty; `params.seed` is set (the router fixes it, so the
    prefill and the decode worker draw the same random numbers for the same positions).

    A *resumed* request (migrated off a worker that died) carries the output tokens the
    client already has (`resumed_token_ids`) and the length of their streamed text
    (`resumed_chars`): the worker continues after them, and `params` stay the original's.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    resumed_token_ids: tuple[int, ...] = ()
    resumed_chars: int = 0

    def __post_init__(self) -> None:
        if not self.request_id:
            raise MessageError("WorkerRequest.request_id must not be empty")
        _set(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        _set(self, "resumed_token_ids", tuple(self.resumed_token_ids))
        if len(self.resumed_token_ids) >= self.params.max_tokens or self.resumed_chars < 0:
            raise MessageError(f"WorkerRequest {self.request_id}: {len(self.resumed_token_ids)}"
                               f" resumed tokens ({self.resumed_chars} chars) for max_tokens "
                               f"{self.params.max_tokens}")

    @property
    def all_token_ids(self) -> tuple[int, ...]:
        """The tokens whose KV a worker computes: the prompt, then the resumed output."""
        return self.prompt_token_ids + self.resumed_token_ids

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "prompt_token_ids": list(self.prompt_token_ids),
                "params": self.params.to_dict(),
                "resumed_token_ids": list(self.resumed_token_ids),
                "resumed_chars": self.resumed_chars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerRequest:
        _check_keys(cls, d)
        return cls(str(d["request_id"]), tuple(int(t) for t in d["prompt_token_ids"]),
                   SamplingParams.from_dict(d["params"]),
                   tuple(int(t) for t in d["resumed_token_ids"]), int(d["resumed_chars"]))


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One output token's log-probability and the most likely alternatives (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        _set(self, "top", tuple(tuple(p) for p in self.top))

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "logprob": self.logprob,
                "top": [list(p) for p in self.top]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLogprob:
        _check_keys(cls, d)
        return cls(int(d["token_id"]), float(d["logprob"]), _pairs(d["top"]))


class EngineOutput(Protocol):
    """What `OutputChunk.from_output` reads (the engine's `RequestOutput`, duck-typed so that
    this module needs no engine import)."""

    new_token_ids: Sequence[int]
    new_text: str
    new_logprobs: Sequence[Any]  # each with token_id, logprob, top
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of one request's output stream, as the client will see it.

    Invariants: an unfinished chunk has no `finish_reason` and zero token counts (the counts
    are the request's totals, known once it finishes); a finished chunk names its reason.
    """

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        _set(self, "token_ids", tuple(self.token_ids))
        _set(self, "logprobs", tuple(self.logprobs))
        if self.finished != bool(self.finish_reason):
            raise MessageError(f"OutputChunk: finished={self.finished} with finish_reason "
                               f"{self.finish_reason!r} (a reason exactly when finished)")
        if not self.finished and (self.prompt_tokens or self.completion_tokens
                                  or self.cached_tokens):
            raise MessageError("OutputChunk: token counts belong to the finishing chunk")

    @property
    def empty(self) -> bool:
        """Nothing for the client: no token, no text, not the end."""
        return not (self.token_ids or self.text or self.finished)

    @classmethod
    def from_output(cls, out: EngineOutput) -> OutputChunk:
        """The chunk for one engine step's output of one request."""
        lps = tuple(TokenLogprob(int(lp.token_id), float(lp.logprob), _pairs(lp.top))
                    for lp in out.new_logprobs)
        if not out.finished:
            return cls(tuple(int(t) for t in out.new_token_ids), out.new_text, lps)
        return cls(tuple(int(t) for t in out.new_token_ids), out.new_text, lps, True,
                   out.finish_reason or "", out.prompt_tokens, out.completion_tokens,
                   out.cached_tokens)

    @classmethod
    def merge(cls, chunks: Iterable[OutputChunk]) -> OutputChunk:
        """One chunk saying what `chunks` say in order: tokens, text and logprobs joined;
        the first finished chunk gives the finish reason and the totals, and anything
        after it is still joined (a stream never produces any). No chunks: an empty one."""
        token_ids: list[int] = []
        text: list[str] = []
        logprobs: list[TokenLogprob] = []
        end: OutputChunk | None = None
        for c in chunks:
            token_ids += c.token_ids
            text.append(c.text)
            logprobs += c.logprobs
            if c.finished and end is None:
                end = c
        if end is None:
            return cls(tuple(token_ids), "".join(text), tuple(logprobs))
        return cls(tuple(token_ids), "".join(text), tuple(logprobs), True, end.finish_reason,
                   end.prompt_tokens, end.completion_tokens, end.cached_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"token_ids": list(self.token_ids), "text": self.text,
                "logprobs": [lp.to_dict() for lp in self.logprobs], "finished": self.finished,
                "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutputChunk:
        _check_keys(cls, d)
        return cls(tuple(int(t) for t in d["token_ids"]), str(d["text"]),
                   tuple(TokenLogprob.from_dict(lp) for lp in d["logprobs"]),
                   bool(d["finished"]), str(d["finish_reason"]), int(d["prompt_tokens"]),
                   int(d["completion_tokens"]), int(d["cached_tokens"]))


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What a prefill worker answers once a request's KV reached the decode worker's sink.

    `token_id` is the first output token, sampled on the prefill worker with the request's
    seed; `logprob` is None unless the request asked for logprobs. `finish_reason` is the
    one-token prefill's own ("length", or "stop" for EOS / a stop token id): the decode
    worker decides whether the request ends there. `first_chunk`, when set, is exactly the
    first chunk the decode worker will stream, so the router may send it to the client
    before the commit (docs/architecture.md, "first token early").
    """

    request_id: str
    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]
    finish_reason: str
    cached_tokens: int
    first_chunk: OutputChunk | None = None

    def __post_init__(self) -> None:
        _set(self, "top_logprobs", tuple(tuple(p) for p in self.top_logprobs))

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "token_id": self.token_id,
                "logprob": self.logprob, "top_logprobs": [list(p) for p in self.top_logprobs],
                "finish_reason": self.finish_reason, "cached_tokens": self.cached_tokens,
                "first_chunk": self.first_chunk.to_dict() if self.first_chunk else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrefillResult:
        _check_keys(cls, d)
        chunk = d["first_chunk"]
        return cls(str(d["request_id"]), int(d["token_id"]),
                   None if d["logprob"] is None else float(d["logprob"]),
                   _pairs(d["top_logprobs"]), str(d["finish_reason"]), int(d["cached_tokens"]),
                   None if chunk is None else OutputChunk.from_dict(chunk))


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """A worker's load and counters, polled by the router (routing) and shown by Admin.Stats.

    `free_blocks` counts blocks a new request could get (cached-prefix blocks included);
    `waiting` on a decode worker includes reservations not yet committed. The handoff
    counters are a prefill worker's (transfer open -> acknowledgement, and first token
    sampled -> acknowledgement); `leases_expired` a decode worker's. `node` is the Ray node
    id, filled in by the actor shell. A worker whose `rank_failure` is set serves nothing
    more and reports `free_blocks` 0.
    """

    worker_id: str
    role: str
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int
    prompt_tokens: int
    generated_tokens: int
    handoffs: int = 0
    handoff_seconds: float = 0.0
    handoff_bytes: int = 0
    handoff_tail_seconds: float = 0.0
    leases_expired: int = 0
    node: str = ""
    # The global KV store (kv_store/), this worker's side: admissions that asked it, blocks
    # and tokens loaded from it (prefill not computed here), blocks this worker saved to it,
    # and the bytes loaded with the seconds their checks and copies took (the router's
    # measured load bandwidth).
    store_lookups: int = 0
    store_hit_blocks: int = 0
    store_hit_tokens: int = 0
    store_saved_blocks: int = 0
    store_loaded_bytes: int = 0
    store_load_seconds: float = 0.0
    tp: int = 1  # the worker's rank group: tensor-parallel ranks x pipeline stages
    pp: int = 1
    rank_failure: str = ""  # why the rank group broke (a rank died or hung); "" if healthy
    # Running requests this worker evicted to free KV blocks, and the computed tokens they
    # lost (recomputed later): a KV pool too small for its load shows here.
    preemptions: int = 0
    preempted_tokens: int = 0
    # Blocks this worker pulled from other nodes' pools into its own node's pool over gRPC
    # (kv_store/peer_service.py), their bytes, and the seconds those pulls took.
    store_pulled_blocks: int = 0
    store_pulled_bytes: int = 0
    store_pull_seconds: float = 0.0
    # Blocks this worker meant to save to the store but dropped: Redis away, its node's pool
    # not mapped, or no free slot (serving goes on; later requests recompute those blocks).
    store_save_skipped: int = 0
    # Steps that ran short prompts alone while requests decoded (engine/scheduler.py, solo
    # prefills): each one delays those requests' next token by a step.
    solo_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerStats:
        _check_keys(cls, d)
        kinds = {"worker_id": str, "role": str, "node": str, "handoff_seconds": float,
                 "handoff_tail_seconds": float, "rank_failure": str,
                 "store_load_seconds": float, "store_pull_seconds": float}
        return cls(**{k: kinds.get(k, int)(v) for k, v in d.items()})


@dataclass(frozen=True, slots=True)
class StorePoolStats:
    """One node's pool of the global KV store, as its store process reads it from the index
    (Admin.Stats, `/metrics`). `indexed` False: the index (Redis) did not answer and the
    figures are unknown (zeros). `tier` is where the pool's blocks live ("cpu": host
    shared memory). Hits are counted by the workers that loaded them (`WorkerStats`)."""

    node: str
    path: str
    tier: str = "cpu"
    indexed: bool = False
    block_bytes: int = 0
    capacity_blocks: int = 0
    used_blocks: int = 0
    pinned_blocks: int = 0
    evictions: int = 0
    puts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StorePoolStats:
        _check_keys(cls, d)
        kinds = {"node": str, "path": str, "tier": str, "indexed": bool}
        return cls(**{k: kinds.get(k, int)(v) for k, v in d.items()})
