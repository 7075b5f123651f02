"""Helpers that tests in several folders share (importable as `testkit`: pytest puts
`tests/` on the path for its conftest): free loopback ports and HF transformers' greedy
reference."""

from __future__ import annotations

import socket
import time

import torch


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free right now (held together while picked, so the
    kernel cannot hand the same one out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def hf_greedy(hf_model, ids: list[int], n: int, pad_token_id: int = 2) -> list[int]:
    """HF transformers' greedy continuation of exactly `n` tokens (EOS suppressed): the
    reference every engine and cluster output is compared with."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id,
        )
    return out[0, len(ids):].tolist()


def worker_handoff(p, d, request_id: str, prompt: list[int], params, reuse: bool = True):
    """One handoff between two plain workers (no Ray): reserve on decode worker `d`
    (offering the prompt for prefix reuse), prefill on prefill worker `p`, commit on `d`;
    returns (the sink `d` published, the generated token ids)."""
    from pdserve.messages import WorkerRequest

    request = WorkerRequest(request_id, tuple(prompt), params)
    sink = d.reserve(request_id, len(prompt), params.max_tokens,
                     prompt_token_ids=prompt if reuse else None)
    first = p.prefill(request, sink)
    chunks = list(d.generate_from_prefill(request, first))
    return sink, [t for c in chunks for t in c.token_ids]


def assert_worker_blocks_back(p, d, timeout: float = 10.0) -> None:
    """Every block free on both plain workers (cached ones count as free), nothing left
    running or reserved. P frees its copy once the push is acknowledged, so poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        ps, ds = p.stats(), d.stats()
        now = (ps.free_blocks, ds.free_blocks, ps.running + ds.running, ds.waiting)
        if now == (ps.total_blocks, ds.total_blocks, 0, 0):
            return
        assert time.monotonic() < deadline, f"(P free, D free, running, reserved) = {now}"
        time.sleep(0.02)
