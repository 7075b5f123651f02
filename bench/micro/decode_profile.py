"""Where a CPU decode step goes, op by op, on one thread and on two: the step's median wall
time and `torch.profiler`'s self CPU time per op, per step, at several batch sizes.

A step on two threads should take about half the matmul time of one; an op whose time
grows with the second thread instead (a small OpenMP region waking a sleeping peer, a
copy faulting fresh pages in) shows up here as a row where the two-thread column is the
larger. Each thread count is its own process (OpenMP reads its settings once); the counts
alternate round by round.

Run: `python -m pdserve.bench.micro.decode_profile [--rows 8,16,24,32] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict

from pdserve.bench.micro.alternate import run_sides
from pdserve.bench.micro.engine_steps import random_prompt

SIDES = ("1", "2")  # threads
TOP_OPS = 8


def _child(threads: int, rows: list[int], steps: int) -> dict:
    from pdserve.engine.cpu_threads import configure_process

    configure_process(threads)  # before torch loads
    from torch.profiler import ProfilerActivity, profile

    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.llm_engine import LLMEngine

    # Steps of any size on every thread: this measures what the second thread gives.
    engine = LLMEngine(EngineConfig(
        model="smollm2-135m-instruct", num_threads=threads, small_step_tokens=0,
        cache=CacheConfig(num_blocks=4096, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(rows), max_num_batched_tokens=2048)))
    rng = random.Random(0)
    out: dict = {}
    for b in rows:
        for i in range(b):
            engine.add_request(f"b{b}-{i}", random_prompt(rng, 64),
                               SamplingParams(temperature=0, max_tokens=3 * steps + 8,
                                              ignore_eos=True))
        for _ in range(8):  # the prefill and warm decode steps
            engine.step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        ops: dict[str, float] = defaultdict(float)
        for e in prof.key_averages():
            ops[e.key] += e.self_cpu_time_total / 1e3 / steps  # ms a step
        while engine.has_unfinished():
            engine.step()
        out[str(b)] = {"step_ms": statistics.median(times) * 1e3, "ops": ops}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,16,24,32", help="decode batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=16, help="steps timed (and profiled) a size")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        import json

        print(json.dumps(_child(int(args.child), rows, args.steps)))
        return 0

    runs = run_sides("pdserve.bench.micro.decode_profile", SIDES, args.rounds,
                     ["--rows", args.rows, "--steps", str(args.steps)],
                     lambda r, side, got: print(
                         f"round {r} {side} thread(s): " + ", ".join(
                             f"{b} rows {v['step_ms']:.1f} ms" for b, v in got.items()),
                         flush=True))
    for b in map(str, rows):
        step = {s: statistics.median(g[b]["step_ms"] for g in runs[s]) for s in SIDES}
        ops = {s: defaultdict(list) for s in SIDES}
        for s in SIDES:
            for g in runs[s]:
                for op, ms in g[b]["ops"].items():
                    ops[s][op].append(ms)
        med = {s: {op: statistics.median(v) for op, v in ops[s].items()} for s in SIDES}
        top = sorted(med["1"], key=lambda op: -med["1"][op])[:TOP_OPS]
        print(f"\n{b} rows: step {step['1']:.1f} ms on 1 thread, {step['2']:.1f} on 2 "
              f"({step['1'] / step['2']:.2f}x); profiler self time, ms a step:")
        print("| op | 1 thread | 2 threads | 1 / 2 |")
        print("| --- | ---: | ---: | ---: |")
        for op in top:
            one, two = med["1"][op], med["2"].get(op, 0.0)
            print(f"| {op} | {one:.2f} | {two:.2f} | {one / two if two else 0:.2f} |")
        rest = {s: sum(v for op, v in med[s].items() if op not in top) for s in SIDES}
        print(f"| (the rest) | {rest['1']:.2f} | {rest['2']:.2f} | "
              f"{rest['1'] / rest['2'] if rest['2'] else 0:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
