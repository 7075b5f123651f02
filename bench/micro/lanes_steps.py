"""Decode steps with the lanes GEMV over codes (`csrc/codes_lanes_avx512.cpp`) against the
routing before it (the row-layout GEMV to 12 rows, oneDNN over float32 past that), in one
engine: B requests decode, and the step time is taken under each routing in turn.

Printed per B: the median decode step under each (ms) and their ratio. The sides alternate
every few steps within a round, so load drifts fall on both.

Run: `python -m pdserve.bench.micro.lanes_steps [--threads 2] [--rows 1,8,16,24,32]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

from pdserve.bench.micro.engine_steps import random_prompt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,16,24,32", help="decoding requests, comma-separated")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="steps a side takes in a turn")
    args = p.parse_args(argv)

    from pdserve.engine.cpu_threads import configure_process

    configure_process(args.threads)  # before torch loads
    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.layers import cpu_kernels
    from pdserve.engine.llm_engine import LLMEngine

    if not (cpu_kernels.load() and cpu_kernels.avx512_codes()):
        print("needs our CPU kernels and a host with AVX-512")
        return 1
    engine = LLMEngine(EngineConfig(
        model="smollm2-135m-instruct", num_threads=args.threads,
        cache=CacheConfig(num_blocks=2048, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)))
    host = cpu_kernels.routing()
    sides = {"lanes": host, "before": replace(host, lanes_rows=0)}
    rng = random.Random(0)
    print(f"{args.threads} thread(s), B requests decoding (64-token prompts); "
          f"median decode step, ms, {args.rounds} rounds of {args.steps} steps a side")
    print("| B | before | lanes | before / lanes |")
    print("| ---: | ---: | ---: | ---: |")
    try:
        for b in [int(r) for r in args.rows.split(",")]:
            rows = [f"b{b}-{i}" for i in range(b)]
            for r in rows:
                engine.add_request(r, random_prompt(rng, 64), SamplingParams(
                    temperature=0, max_tokens=4000, ignore_eos=True))
            while engine.scheduler.waiting:
                engine.step()
            times: dict[str, list[float]] = {s: [] for s in sides}
            for rnd in range(args.rounds + 1):  # round 0 warms both up, kept out
                for side in (sides if rnd % 2 else reversed(sides)):
                    cpu_kernels.set_routing(sides[side])
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        engine.step()
                        if rnd:
                            times[side].append((time.perf_counter() - start) * 1e3)
            for r in rows:
                engine.abort(r)
            while engine.has_unfinished():
                engine.step()
            before, lanes = (statistics.median(times[s]) for s in ("before", "lanes"))
            print(f"| {b} | {before:.1f} | {lanes:.1f} | {before / lanes:.2f}x |", flush=True)
    finally:
        cpu_kernels.set_routing(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
