"""What one benchmark request looked like on the wire.

Every figure the benchmark reports is computed from these records, and every record is
written to the JSON report, so any figure can be recomputed later from the raw timings.
Timestamps are ``time.perf_counter()`` seconds in the benchmarking process; only their
differences mean anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    """One request's timings and outcome.

    ``chunk_times[i]`` is when streamed response ``i`` arrived and ``chunk_tokens[i]`` how
    many new tokens it carried (a final response may carry none, only the finish reason).
    ``error`` is None for a request whose stream ended normally.
    """

    request_id: str
    input_len: int  # prompt length the workload asked for (exact for token-id prompts)
    output_len: int  # max_tokens requested
    tag: str = ""  # workload-specific label, e.g. "prefix2/q5" or "chat1/turn3"
    send_time: float = 0.0
    first_token_time: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end_time: float | None = None
    prompt_tokens: int = 0  # from the server's final Usage (0 when never received)
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the request completed: no error, not aborted, at least one token."""
        return (
            self.error is None
            and self.finish_reason != "abort"
            and self.first_token_time is not None
            and self.end_time is not None
        )

    @property
    def streamed_tokens(self) -> int:
        """Output tokens actually received; the timings describe exactly these tokens."""
        return sum(self.chunk_tokens)

    def add_chunk(self, when: float, num_tokens: int) -> None:
        """Record one streamed response arriving at ``when`` carrying ``num_tokens`` tokens."""
        self.chunk_times.append(when)
        self.chunk_tokens.append(num_tokens)
        if num_tokens > 0 and self.first_token_time is None:
            self.first_token_time = when

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict`` reverses it exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        """Rebuild a record from ``to_dict`` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RequestRecord fields: {sorted(unknown)}")
        record = cls(**data)
        record.chunk_times = [float(t) for t in record.chunk_times]
        record.chunk_tokens = [int(n) for n in record.chunk_tokens]
        return record
