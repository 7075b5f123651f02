"""`pdserve demo` (the README's first command) runs the disaggregated path end to end."""

from __future__ import annotations

import io
import re

import pytest

from pdserve.cluster.cli import DEFAULT_CONFIG
from pdserve.cluster.config import load_config
from pdserve.cluster.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_streams_through_a_handoff_and_frees_the_blocks():
    out = io.StringIO()
    assert run_demo(load_config(DEFAULT_CONFIG), "Say hello.", max_tokens=8, out=out) == 0
    text = out.getvalue()
    assert "workers: prefill-0 (prefill), decode-0 (decode)" in text
    assert re.search(r"8 tokens, finish reason length", text), text
    assert re.search(r"prefill-0 prefilled the prompt and handed its KV off over grpc: "
                     r"1 handoff\(s\), [1-9]\d* KiB", text), text
    free = re.search(r"decode-0 decoded 8 token\(s\); its KV blocks free again: (\d+)/(\d+)",
                     text)
    assert free and free.group(1) == free.group(2), text
