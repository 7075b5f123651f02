"""Service-level objectives and the ``--slo`` string that states them.

``ttft=500ms,tpot=50ms,e2e=2s``: each key is a latency bound a request must meet; units are
``ms`` or ``s`` and are required, because a bare number is exactly the ambiguity an SLO
string must not have.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_KEYS = ("ttft", "tpot", "e2e")
_VALUE = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)$")


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency bounds in seconds; None means the figure is not constrained."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @property
    def empty(self) -> bool:
        """True when no bound is set (every completed request then meets the SLO)."""
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def __str__(self) -> str:
        parts = [
            f"{key}={value * 1000:g}ms"
            for key, value in zip(_KEYS, (self.ttft_s, self.tpot_s, self.e2e_s), strict=True)
            if value is not None
        ]
        return ",".join(parts)


def parse_slo(text: str | None) -> SLO:
    """Parse ``ttft=500ms,tpot=50ms,e2e=2s`` into an SLO.

    An empty or None string gives an empty SLO. Unknown keys, repeated keys, missing or
    unknown units, and values that are not positive finite numbers raise ValueError with a
    message naming the offending part.
    """
    if text is None or not text.strip():
        return SLO()
    bounds: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        key, sep, raw = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"SLO part {part!r} is not key=value (e.g. ttft=500ms)")
        if key not in _KEYS:
            raise ValueError(f"unknown SLO key {key!r} in {part!r}; known keys: {', '.join(_KEYS)}")
        if key in bounds:
            raise ValueError(f"SLO key {key!r} given twice")
        match = _VALUE.match(raw.strip())
        if match is None:
            raise ValueError(
                f"bad SLO value {raw.strip()!r} for {key}: expected a number with unit ms or s "
                "(e.g. 500ms, 2s)"
            )
        seconds = float(match.group(1)) * (1e-3 if match.group(2) == "ms" else 1.0)
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"SLO bound for {key} must be > 0, got {raw.strip()!r}")
        bounds[key] = seconds
    return SLO(bounds.get("ttft"), bounds.get("tpot"), bounds.get("e2e"))
