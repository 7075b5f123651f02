"""Per-request sampling parameters, validated once at the edge.

`SamplingParams` is what a client asks for. It is checked in `__post_init__` so that a bad
value fails at the router with a message naming the field, never deep inside a worker's
step. It crosses process boundaries as a plain JSON-able dict (`to_dict` / `from_dict`),
never pickled.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

MAX_LOGPROBS = 20
_SEED_LIMIT = 2**64


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass in Python, but `max_tokens=True` is always a caller bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    Invariants after construction: `1 <= max_tokens`, `0 <= min_tokens <= max_tokens`,
    `temperature` finite and `>= 0` (0 means greedy), `0 < top_p <= 1`, `top_k == -1`
    (off) or `>= 1`, `0 <= min_p <= 1`, `seed` None or in `[0, 2**64)`, `logprobs` None or in
    `[0, 20]`, `stop` a tuple of non-empty strings, `stop_token_ids` a tuple of ints `>= 0`.

    `seed=None` means the caller (the router) draws a random seed for the request once, so
    that prefill and decode workers still share it. `stop` strings are matched by the
    detokenizer, not the sampler; `stop_token_ids` end a request like EOS does.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.max_tokens = _as_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        self.temperature = _as_float("temperature", self.temperature)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        self.top_p = _as_float("top_p", self.top_p)
        # Written as `not (a < x <= b)` so that NaN is rejected too.
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        self.min_p = _as_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
            if not 0 <= self.seed < _SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(
                f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__} "
                f"{self.ignore_eos!r}"
            )
        if self.logprobs is not None:
            self.logprobs = _as_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}"
                )

    @staticmethod
    def _normalise_stop(stop: Any) -> tuple[str, ...]:
        # A bare string is one stop string, not a sequence of one-character stops.
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple):
            raise ValueError(f"stop must be a list of strings, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        return tuple(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
        if not isinstance(ids, list | tuple):
            raise ValueError(f"stop_token_ids must be a list of ints, got {type(ids).__name__}")
        out = tuple(_as_int("stop_token_ids", t) for t in ids)
        for t in out:
            if t < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {t}")
        return out

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    def validate_against(self, vocab_size: int) -> None:
        """Check the fields that depend on the model: every stop token id is in the vocab."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids must be < vocab_size={vocab_size}, got {t}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON/msgpack-able values (tuples become lists)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Inverse of `to_dict`; missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling fields: {', '.join(unknown)}")
        return cls(**d)
