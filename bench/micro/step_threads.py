"""One thread for small steps (`engine.cpu_threads.StepThreads`) against every step on all
of an engine's threads: the steps of 1-, 4- and 16-row decodes and of their prefills.

Each side is its own process (`small_step_tokens` at its default vs 0, the same
`--threads`); sides alternate round by round. Printed per side: the median prefill step of
64 tokens (one prompt, then 16 together) and the median decode step at 1, 4 and 16 rows,
in ms.

Run: `python -m pdserve.bench.micro.step_threads [--threads 2] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pdserve.bench.micro.alternate import run_sides
from pdserve.bench.micro.engine_steps import random_prompt

SIDES = {"small-on-1": None, "all-threads": 0}  # None: EngineConfig's default


def _child(small: int | None, threads: int) -> dict:
    from pdserve.engine.cpu_threads import configure_process

    configure_process(threads)  # before torch loads
    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.llm_engine import LLMEngine

    rule = {} if small is None else {"small_step_tokens": small}
    engine = LLMEngine(EngineConfig(
        model="smollm2-135m-instruct", num_threads=threads, **rule,
        cache=CacheConfig(num_blocks=1024, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512)))
    rng = random.Random(0)

    def run(batch: int, steps: int) -> tuple[float, float]:
        for _ in range(batch):
            engine.add_request(f"r{rng.random()}", random_prompt(rng, 64),
                               SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
        times = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        return times[0] * 1e3, statistics.median(times[1:]) * 1e3

    for _ in range(2):  # warm-up: every shape once
        for batch in (1, 4, 16):
            run(batch, 8)
    one = [run(1, 32) for _ in range(6)]
    four = [run(4, 32) for _ in range(3)]
    sixteen = [run(16, 32) for _ in range(3)]
    return {"prefill64": statistics.median(r[0] for r in one),
            "decode1": statistics.median(r[1] for r in one),
            "decode4": statistics.median(r[1] for r in four),
            "prefill64x16": statistics.median(r[0] for r in sixteen),
            "decode16": statistics.median(r[1] for r in sixteen)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(SIDES[args.child], args.threads)))
        return 0

    def show(r: int, side: str, got: dict) -> None:
        print(f"round {r} {side:12s} " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()),
              flush=True)

    runs = run_sides("pdserve.bench.micro.step_threads", tuple(SIDES), args.rounds,
                     ["--threads", str(args.threads)], show)
    keys = ("prefill64", "decode1", "decode4", "prefill64x16", "decode16")
    print(f"\n| side ({args.threads} threads, median of {args.rounds} rounds) | "
          "prefill 64 ms | decode 1 row ms | decode 4 rows ms | prefill 16 x 64 ms | "
          "decode 16 rows ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for side, got in runs.items():
        print(f"| {side} | " + " | ".join(
            f"{statistics.median(g[k] for g in got):.1f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
