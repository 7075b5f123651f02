"""Spawning the ranks of a rank group as local processes (torch.multiprocessing, spawn),
for the tensor-parallel tests: each rank joins the group over loopback TCP."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(fn: Callable, args: tuple, nprocs: int):
    """Start `fn(rank, *args)` in `nprocs` spawned processes; returns the process context."""
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")


def join_all(ctx, timeout_s: float) -> None:
    """Wait for every rank to exit cleanly (raises if one failed), then kill leftovers."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout_s}s")
    finally:
        kill_all(ctx)


def kill_all(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join(5)
