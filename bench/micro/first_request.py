"""The first prompt a CPU engine serves against the ones after it: start-up time, then the
steps of a few prompts in a row, with oneDNN's packed weights made at load (what a worker
does) and made by the first prompt instead (`linear.pack_for_prefill` skipped: what workers
did before it).

Each side is its own process (a fresh engine, nothing warm); sides alternate round by round.
Printed per side: engine start-up, then each prompt's prefill step in ms.

Run: `python -m pdserve.bench.micro.first_request [--threads 1] [--rounds 2] [--prompt-len 64]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pdserve.bench.micro.alternate import run_sides
from pdserve.bench.micro.engine_steps import prefill_ms, random_prompt

SIDES = ("at-load", "first-prompt")


def _child(side: str, threads: int, prompt_len: int, prompts: int) -> dict:
    from pdserve.engine.cpu_threads import configure_process

    configure_process(threads)  # before torch loads
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.layers import linear
    from pdserve.engine.llm_engine import LLMEngine

    if side == "first-prompt":
        linear.pack_for_prefill = lambda weights: 0  # `dense` packs each weight at first use
    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model="smollm2-135m-instruct", num_threads=threads,
        cache=CacheConfig(num_blocks=256, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)))
    startup = time.perf_counter() - start
    rng = random.Random(0)
    steps = [prefill_ms(engine, f"r{i}", random_prompt(rng, prompt_len))
             for i in range(prompts)]
    return {"startup_s": startup, "prefill_ms": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.threads, args.prompt_len, args.prompts)))
        return 0

    def show(r: int, side: str, got: dict) -> None:
        print(f"round {r} {side:12s} start-up {got['startup_s']:.2f} s, prefill ms "
              + " ".join(f"{x:.0f}" for x in got["prefill_ms"]), flush=True)

    runs = run_sides("pdserve.bench.micro.first_request", SIDES, args.rounds,
                     ["--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
                      "--prompts", str(args.prompts)], show)
    print(f"\n| side | start-up s | first prompt ms | later prompts ms ({args.prompt_len} tokens, "
          f"{args.threads} thread(s), median of {args.rounds} rounds) |")
    print("| --- | ---: | ---: | ---: |")
    for side, got in runs.items():
        later = [x for g in got for x in g["prefill_ms"][1:]]
        print(f"| {side} | {statistics.median(g['startup_s'] for g in got):.2f} | "
              f"{statistics.median(g['prefill_ms'][0] for g in got):.0f} | "
              f"{statistics.median(later):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
