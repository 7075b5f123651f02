"""Cost of the rank group's control channel per step on CPU: two spawned ranks over loopback
gloo; each iteration the driver sends a decode step's `StepInput` (batch B, 64-block tables)
and both ranks then run one all-reduce, as a TP layer would (so the time includes the
follower receiving the step). `--no-send` times the all-reduce alone.

    python -m pdserve.bench.micro.control_channel --iters 300
"""

from __future__ import annotations

import argparse
import json
import socket
import time

import torch
import torch.multiprocessing as mp


def _rank(rank: int, port: int, batch: int, iters: int, send: bool, out) -> None:
    import torch.distributed as dist

    from pdserve.engine.executor.group import init_rank_group
    from pdserve.engine.executor.step import StepInput

    torch.set_num_threads(1)
    g = init_rank_group(rank, 2, f"tcp://127.0.0.1:{port}", "cpu")
    step = StepInput(list(range(batch)), [1] * batch, [1000] * batch,
                     [list(range(64))] * batch, [True] * batch)
    x = torch.zeros(576)
    warmup = 20
    for it in range(iters + warmup):
        if it == warmup:
            t0 = time.perf_counter()
        if send and rank == 0:
            g.control.send({"op": "step", "id": it, "step": step.to_plain()})
        elif send:
            g.control.recv()
        dist.all_reduce(x, group=g.parallel.tp_group)
    if rank == 0:
        out.put((time.perf_counter() - t0) / iters * 1e3)
    g.destroy()


def measure(batch: int, iters: int, send: bool) -> float:
    """Milliseconds per iteration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, batch, iters, send, out))
             for r in range(2)]
    for p in procs:
        p.start()
    ms = out.get(timeout=600)
    for p in procs:
        p.join(60)
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    rows = []
    for r in range(a.rounds):
        for b in (int(x) for x in a.batches.split(",")):
            alone, with_step = measure(b, a.iters, False), measure(b, a.iters, True)
            rows.append({"round": r, "batch": b, "allreduce_ms": alone,
                         "step_and_allreduce_ms": with_step, "step_ms": with_step - alone})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
