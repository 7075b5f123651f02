"""How a CPU worker process uses its cores: a thread count, and OpenMP threads that sleep
while they wait.

torch runs its CPU kernels (oneDNN, MKL, ATen loops) on one OpenMP pool. By default each
thread of that pool spins at every barrier before it sleeps, which on a machine shared with
other processes (or other workers) keeps a core busy doing nothing, and keeps the peer the
barrier waits for — descheduled beside another process on the other core — from being moved
to the core the spinner holds: every one of a decode step's ~120 matmuls then waits for a
time slice. Passive waiting (`OMP_WAIT_POLICY=PASSIVE`) puts a waiting thread to sleep at
once, so the step slows in proportion to the cores taken, not by an order of magnitude.

OpenMP reads its environment once, when the library loads (the first `import torch`), so
`worker_env` must be in a process's environment before that: `configure_process` sets it
when torch is not loaded yet and says so when it is too late. Imports no torch at module
level.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("pdserve.engine")

# Variables OpenMP and MKL read at load time; what a worker's process gets.
_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_env(threads: int) -> dict[str, str]:
    """The environment a worker process with `threads` compute threads should start with."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, **_WAIT}


def configure_process(threads: int) -> None:
    """Give this process `threads` torch threads and passive OpenMP waiting.

    Call it before anything imports torch (a worker's first act); a wait policy the user
    set in the environment is kept. After torch is loaded the thread count still applies,
    the wait policy does not (logged).
    """
    env = worker_env(threads)
    late = "torch" in sys.modules
    for key, value in env.items():
        if key in _WAIT:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value
    if late:
        log.warning("torch was imported before the worker's thread settings: OpenMP keeps "
                    "the wait policy it loaded with (%s)",
                    os.environ.get("OMP_WAIT_POLICY", "spin, then sleep"))
    import torch

    torch.set_num_threads(threads)
    try:  # inter-op parallelism is unused here; one thread, not one a core
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass


class StepThreads:
    """How many threads a CPU rank's step runs on: one for a step of at most `small_tokens`
    tokens (a decode batch of a few rows, a short prompt), all `threads` for larger ones.

    Why: a small step is ~120 matmuls of a few rows each, ~50-100 us of work apiece, and
    every one of them is an OpenMP region whose sleeping threads take ~60 us to wake on a
    shared VM (passive waits, above). On the 2-core AVX-512 host a 1-row decode step takes
    11-12 ms on one thread and 15-19 on two, a 4-row one 15-16 vs 20-27; from 6 to 8 rows
    the two are level within noise, past them the second thread gains (up to ~1.2x at 32-48
    rows), and a 64-token prefill takes 61-73 ms on two against 75-85 on one
    (docs/benchmarks.md, "One thread for small steps"). The idle core then serves the
    router, the client and the other processes a small step would otherwise wait on.

    Invariant: the thread count changes only between steps (it is set on the thread that
    runs the step, before the step), and every rank of a replica sees the same steps, so
    they decide alike.
    """

    def __init__(self, threads: int, small_tokens: int):
        self.threads = threads
        self.small_tokens = small_tokens

    def before_step(self, tokens: int) -> None:
        import torch

        want = 1 if tokens <= self.small_tokens else self.threads
        if torch.get_num_threads() != want:  # as the calling thread sees it
            torch.set_num_threads(want)

    @classmethod
    def for_rank(cls, small_tokens: int) -> StepThreads | None:
        """This process's rule (its current thread count as the large steps' one); None
        where there is nothing to switch: one thread, or the rule off."""
        import torch

        threads = torch.get_num_threads()
        if threads <= 1 or small_tokens <= 0:
            return None
        return cls(threads, small_tokens)
