"""When requests are sent: Poisson (or burstier) arrivals, fixed concurrency, all at once.

Inter-arrival gaps are gamma distributed with ``shape = burstiness`` and mean ``1 / rate``.
Burstiness 1 is exactly a Poisson process (exponential gaps); below 1 the gaps are more
variable (bursts and lulls, variance ``1 / (rate**2 * burstiness)``), above 1 more regular.
A concurrency cap may be combined with a rate: a request then waits both for its arrival
time and for a free slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Arrival:
    """How requests are released.

    ``rate`` None means no pacing: with ``concurrency`` set that is a closed loop of that many
    clients, without it every request is sent at once.
    """

    rate: float | None = None
    burstiness: float = 1.0
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"request rate must be a positive number, got {self.rate}")
        if not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    @property
    def label(self) -> str:
        """Short human description, used in tables and plot legends."""
        parts = []
        if self.rate is not None:
            parts.append(f"rate={self.rate:g}/s")
            if self.burstiness != 1.0:
                parts.append(f"burstiness={self.burstiness:g}")
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        return ", ".join(parts) or "all-at-once"

    def send_offsets(self, n: int, seed: int) -> list[float]:
        """Seconds after the start at which each of ``n`` requests becomes due."""
        if self.rate is None:
            return [0.0] * n
        return gamma_offsets(n, self.rate, self.burstiness, seed)


def gamma_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Arrival times of ``n`` requests with gamma(shape=burstiness, mean=1/rate) gaps.

    The first request is due at 0 (waiting a random gap before it measures nothing), so the
    ``n - 1`` later ones follow the process. Deterministic for a given ``seed``.
    """
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
