"""Helpers that tests in several folders share (importable as `testkit`: pytest puts
`tests/` on the path for its conftest): free loopback ports and HF transformers' greedy
reference."""

from __future__ import annotations

import socket

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
