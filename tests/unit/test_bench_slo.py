"""The --slo string parser: good strings, and every kind of bad one."""

from __future__ import annotations

import pytest

from pdserve.bench.slo import SLO, parse_slo


def test_parses_units_and_keys():
    slo = parse_slo("ttft=500ms, tpot=50ms,e2e=2s")
    assert slo == SLO(ttft_s=pytest.approx(0.5), tpot_s=pytest.approx(0.05), e2e_s=2.0)
    assert parse_slo("TTFT=1.5s").ttft_s == pytest.approx(1.5)
    assert parse_slo("") == SLO() and parse_slo(None).empty


def test_str_round_trips():
    slo = parse_slo("ttft=250ms,e2e=3s")
    assert parse_slo(str(slo)) == slo
    assert str(slo) == "ttft=250ms,e2e=3000ms"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("latency=5ms", "unknown SLO key 'latency'"),
        ("ttft=500", "expected a number with unit ms or s"),
        ("ttft=5min", "expected a number with unit ms or s"),
        ("ttft=fastms", "expected a number with unit ms or s"),
        ("ttft=-5ms", "expected a number with unit ms or s"),
        ("ttft=0ms", "must be > 0"),
        ("ttft=1ms,ttft=2ms", "given twice"),
        ("ttft", "not key=value"),
    ],
)
def test_bad_strings_raise_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_slo(text)
