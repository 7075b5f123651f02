"""Arrival processes: the right mean rate, burstiness that changes variance, fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.bench.arrival import Arrival, gamma_offsets


def gaps(rate, burstiness, n=20000, seed=1):
    return np.diff(gamma_offsets(n, rate, burstiness, seed))


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_mean_gap_is_one_over_rate(rate):
    assert gaps(rate, 1.0).mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps(rate, 0.3).mean() == pytest.approx(1 / rate, rel=0.05)


def test_burstiness_changes_variance():
    # Gamma(shape=b) gaps have squared coefficient of variation 1 / b; Poisson has 1.
    cv2 = {b: gaps(2.0, b).var() / gaps(2.0, b).mean() ** 2 for b in (0.25, 1.0, 4.0)}
    assert cv2[1.0] == pytest.approx(1.0, rel=0.08)
    assert cv2[0.25] == pytest.approx(4.0, rel=0.12)
    assert cv2[4.0] == pytest.approx(0.25, rel=0.08)


def test_seeded_and_starting_at_zero():
    first = gamma_offsets(50, 3.0, 1.0, seed=7)
    assert first == gamma_offsets(50, 3.0, 1.0, seed=7)
    assert first != gamma_offsets(50, 3.0, 1.0, seed=8)
    assert first[0] == 0.0 and all(b >= a for a, b in zip(first, first[1:], strict=False))


def test_unpaced_modes_send_everything_at_once():
    assert Arrival().send_offsets(3, seed=0) == [0.0, 0.0, 0.0]
    assert Arrival(concurrency=2).send_offsets(2, seed=0) == [0.0, 0.0]
    assert Arrival().label == "all-at-once"
    assert Arrival(2.0, 0.5, 4).label == "rate=2/s, burstiness=0.5, concurrency=4"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.0},
        {"rate": -1.0},
        {"rate": float("inf")},
        {"burstiness": 0.0},
        {"concurrency": 0},
    ],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        Arrival(**kwargs)
