"""Solo prefills (engine/scheduler.py) against mixed steps, step by step: a 64-token prompt
arrives while `B` requests decode.

- mixed (`solo_prefill_tokens=0`): one step holds the prompt and the B decode rows; the
  prompt's first token and the rows' next one come at its end;
- solo: the prompt runs alone (its first token at the end), then the rows (and the new
  request's second token) in the next step.

Printed per B, medians over `--rounds` (the two alternate in one engine, so load drifts fall
on both): the prompt's first token (ms from the step's start) and the rows' wait for their
next token, each way. The trade is the first against the second: what the prompt gains,
against what the rows lose once.

Run: `python -m pdserve.bench.micro.solo_prefill [--threads 2] [--rows 1,8,16,24] [--rounds 6]`.
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
    p.add_argument("--rows", default="1,8,16,24", help="decoding requests, comma-separated")
    p.add_argument("--prompt", type=int, default=64, help="tokens of the arriving prompt")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)

    from pdserve.engine.cpu_threads import configure_process

    configure_process(args.threads)  # before torch loads
    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model="smollm2-135m-instruct", num_threads=args.threads,
        cache=CacheConfig(num_blocks=2048, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512)))
    config = engine.scheduler.config
    rng = random.Random(0)
    ids = iter(range(1 << 30))

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def arrival(solo: int, rows: list[str]) -> tuple[float, float]:
        """(prompt's first token, rows' next token), ms from the arrival step's start."""
        engine.scheduler.config = replace(config, solo_prefill_tokens=solo)
        rid = f"p{next(ids)}"
        engine.add_request(rid, random_prompt(rng, args.prompt), greedy(2))
        start, first, rows_next = time.perf_counter(), None, None
        while first is None or rows_next is None:
            outputs = engine.step()
            now = (time.perf_counter() - start) * 1e3
            got = {o.request_id for o in outputs}
            first = now if first is None and rid in got else first
            rows_next = now if rows_next is None and rows[0] in got else rows_next
        while any(engine.scheduler.waiting) or any(  # let the new request finish
                s.request_id == rid for s in engine.scheduler.running):
            engine.step()
        return first, rows_next

    print(f"{args.threads} thread(s), a {args.prompt}-token prompt arriving beside B decode "
          "rows; ms, median of the rounds")
    print("| B | first token mixed | solo | rows' next token mixed | solo |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for b in [int(r) for r in args.rows.split(",")]:
        rows = [f"d{next(ids)}" for _ in range(b)]
        for r in rows:
            engine.add_request(r, random_prompt(rng, args.prompt), greedy(4000))
        for _ in range(4):
            engine.step()
        got: dict[int, list[tuple[float, float]]] = {0: [], 128: []}
        for solo in (128, 0):  # warm-up: every shape once
            arrival(solo, rows)
        for r in range(args.rounds):
            for solo in ((0, 128) if r % 2 else (128, 0)):
                got[solo].append(arrival(solo, rows))
        for r in rows:
            engine.abort(r)
        while engine.has_unfinished():
            engine.step()
        med = {s: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
               for s, v in got.items()}
        print(f"| {b} | {med[0][0]:.1f} | {med[128][0]:.1f} | {med[0][1]:.1f} | "
              f"{med[128][1]:.1f} |", flush=True)
    engine.scheduler.config = config
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
