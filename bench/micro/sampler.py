"""The sampler's top-k / top-p on CPU: the top `CANDIDATES` tokens ranked exactly (the
default) against a stable sort of the whole vocabulary, one process, interleaved, on
logits shaped like a trained model's (a few strong tokens over a long tail). Reports ms a
call and whether both gave the same tokens.

Run: `python -m pdserve.bench.micro.sampler [--rows 16] [--vocab 49152] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1, help="-1: off")
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)

    from pdserve.engine.cpu_threads import configure_process

    configure_process(args.threads)
    import torch

    from pdserve.engine import sampler as sampler_module
    from pdserve.engine.sampler import Sampler, SampleRequest
    from pdserve.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=gen) * 2.0
    logits[:, :50] += 8.0
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    rows = [SampleRequest(params, seed=i, position=3, num_generated=0, eos_token_ids=())
            for i in range(args.rows)]
    sides = {"candidates": sampler_module.CANDIDATES, "full sort": args.vocab}
    times: dict[str, list[float]] = {s: [] for s in sides}
    tokens: dict[str, list[int]] = {}
    sampler = Sampler()
    default = sampler_module.CANDIDATES
    try:
        for rnd in range(args.rounds):
            for side in (list(sides) if rnd % 2 == 0 else list(reversed(sides))):
                sampler_module.CANDIDATES = sides[side]
                t = time.perf_counter()
                tokens[side] = [r.token_id for r in sampler(logits, rows)]
                times[side].append(time.perf_counter() - t)
    finally:
        sampler_module.CANDIDATES = default
    a, b = (1e3 * statistics.median(times[s]) for s in ("full sort", "candidates"))
    print(f"{args.rows} rows x {args.vocab}, top_p {args.top_p}, top_k {args.top_k}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}: full sort {a:.1f} ms, "
          f"candidates {b:.1f} ms ({a / b:.2f}x); same tokens: "
          f"{tokens['full sort'] == tokens['candidates']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
