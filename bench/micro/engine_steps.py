"""Timing an engine's prompts for the micro-benchmarks: random prompts that share no
prefix, and the wall time of a prompt's prefill (the request asks for one token)."""

from __future__ import annotations

import random
import time


def random_prompt(rng: random.Random, length: int) -> list[int]:
    """`length` token ids drawn from the ordinary vocabulary (no special tokens)."""
    return [rng.randrange(1000, 40000) for _ in range(length)]


def prefill_ms(engine, request_id: str, ids: list[int]) -> float:
    """Add a one-token greedy request and run the engine until it is done; its ms."""
    from pdserve.engine import SamplingParams

    engine.add_request(request_id, ids, SamplingParams(temperature=0, max_tokens=1,
                                                       ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - start) * 1e3
