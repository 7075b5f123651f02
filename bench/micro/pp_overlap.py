"""Decode tokens/s of one two-stage pipeline worker with cross-step overlap on and off.

Two spawned processes form a PP2 rank group over loopback gloo (rank 0 = the driver and
stage 0, rank 1 = stage 1), as a cluster worker with `pp: 2` runs. The driver builds two
engines over the one executor — `pipeline_overlap` on and off; the same weights, ranks and
KV pool, used one after the other — and alternates them round by round, so drift from
other processes on the machine falls on both alike. Each run adds `--concurrency`
requests of `--prompt-len` distinct tokens, steps until every prompt is prefilled, then
times the decode of `--new-tokens` tokens each (EOS ignored). Printed: decode tokens/s
and ms per generated-token round per run, how long the driver spent running its own stage
and waiting for the last stage's logits, the medians, and the load average before and
after (`os.getloadavg`).

Run: `python -m pdserve.bench.micro.pp_overlap [--model smollm2-135m-instruct]
[--concurrency 4] [--new-tokens 32] [--rounds 3] [--threads 1] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import replace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode_run(engine, tag: str, args) -> dict:
    """One run: prefill `concurrency` prompts, then time their decode to the end."""
    from pdserve.engine import SamplingParams

    n = args.new_tokens + 1  # the first token comes with the prefill
    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)
    for i in range(args.concurrency):
        base = 100 + 1000 * i + 7 * len(tag)  # distinct prompts: no prefix reuse
        engine.add_request(f"{tag}-{i}", list(range(base, base + args.prompt_len)), params)
    steps = 0
    while engine.scheduler.waiting or any(s.in_prefill for s in engine.scheduler.running):
        engine.step()
        steps += 1
    gen0, steps0, t0 = engine.stats["generated_tokens"], engine.stats["steps"], \
        time.perf_counter()
    timer = engine.executor.timer
    timer.clear()
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    tokens = engine.stats["generated_tokens"] - gen0
    return {"tok_s": tokens / dt, "ms_per_round": 1000 * dt * args.concurrency / tokens,
            "steps": engine.stats["steps"] - steps0, "tokens": tokens,
            "stage0_s": timer.get("submit", 0.0), "wait_s": timer.get("collect", 0.0),
            "wall_s": dt}


def _timed_executor(config, group):
    """The driver's executor, timing the driver's own stage (`submit`: broadcast, stage 0's
    layers, sends) apart from its waits for the last stage's logits (`collect`)."""
    from pdserve.engine.executor.multiproc import MultiprocExecutor

    class Timed(MultiprocExecutor):
        timer: dict[str, float] = {}

        def submit(self, step, kv_connector=None):
            t = time.perf_counter()
            try:
                return super().submit(step, kv_connector)
            finally:
                self.timer["submit"] = self.timer.get("submit", 0.0) + time.perf_counter() - t

        def collect(self, handle):
            t = time.perf_counter()
            try:
                return super().collect(handle)
            finally:
                self.timer["collect"] = self.timer.get("collect", 0.0) + time.perf_counter() - t

    return Timed(config, group)


def _rank_main(rank: int, port: int, args, out: str) -> None:
    import torch

    from pdserve.engine.executor.group import init_rank_group
    from pdserve.engine.executor.multiproc import Follower
    from pdserve.engine.llm import engine_config
    from pdserve.engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    group = init_rank_group(rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=120, pp_size=2)
    config = engine_config(args.model, pipeline_parallel_size=2, num_threads=args.threads,
                           num_blocks=args.num_blocks, enable_prefix_caching=False,
                           max_num_seqs=64, max_num_batched_tokens=2048)
    try:
        if not group.is_driver:
            Follower(config, group).run()
            return
        executor = _timed_executor(config, group)
        off = replace(config, parallel=replace(config.parallel, pipeline_overlap=False))
        engines = {"overlap": LLMEngine(config, executor=executor),
                   "no-overlap": LLMEngine(off, executor=executor)}
        _decode_run(engines["overlap"], "warm", args)  # first-touch costs out of the table
        rows = []
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for mode in order:
                row = {"round": r, "mode": mode, **_decode_run(engines[mode], f"{mode}{r}", args)}
                rows.append(row)
                print(f"round {r} {mode:>10}: {row['tok_s']:7.1f} tok/s, "
                      f"{row['ms_per_round']:6.1f} ms/token-round, {row['steps']} steps; "
                      f"driver: stage 0 {row['stage0_s']:.2f} s, waiting for logits "
                      f"{row['wait_s']:.2f} s of {row['wall_s']:.2f} s", flush=True)
        with open(out, "w") as f:
            json.dump(rows, f)
        executor.shutdown()
    finally:
        group.destroy()


def main(argv: list[str] | None = None) -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    out = args.json or f"/tmp/pp_overlap_{os.getpid()}.json"
    load0 = os.getloadavg()
    ctx = mp.start_processes(_rank_main, args=(_free_port(), args, out), nprocs=2,
                             join=True, start_method="spawn")
    del ctx
    load1 = os.getloadavg()
    with open(out) as f:
        rows = json.load(f)
    print(f"\nPP2, {args.concurrency} requests x {args.new_tokens} tokens, {args.threads} "
          f"thread(s) a rank; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    for mode in ("overlap", "no-overlap"):
        mine = [r["tok_s"] for r in rows if r["mode"] == mode]
        ms = [r["ms_per_round"] for r in rows if r["mode"] == mode]
        share = [r["wait_s"] / r["wall_s"] for r in rows if r["mode"] == mode]
        stage0 = [r["stage0_s"] / r["wall_s"] for r in rows if r["mode"] == mode]
        print(f"  {mode:>10}: median {statistics.median(mine):7.1f} tok/s "
              f"({', '.join(f'{x:.1f}' for x in mine)}), "
              f"{statistics.median(ms):.1f} ms/token-round; driver in stage 0 "
              f"{statistics.median(stage0):.0%}, waiting for logits "
              f"{statistics.median(share):.0%} of the time")
    if not args.json:
        os.unlink(out)


if __name__ == "__main__":
    sys.exit(main())
