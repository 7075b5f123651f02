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
