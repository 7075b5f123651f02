"""Products over block codes, AVX2 against AVX-512 (row layout and lanes layout), against
oneDNN over float32: every weight of SmolLM2-135M (its projections and LM head) once a pass,
at each row count.

Where `engine.layers.cpu_kernels.Routing` draws its lines on an AVX-512 host: rows up to
`lanes_rows` go to our GEMV over the codes in the lanes layout, more rows to oneDNN unless
the GEMM over codes is faster. Passes alternate the four sides, reversed round by round, so
drift falls on all; the best pass of the rounds is kept.

Run: `python -m pdserve.bench.micro.codes_isa [--threads 1] [--rounds 5] [--rows 1,4,8,...]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pdserve.engine.cpu_threads import configure_process

SIDES = ("onednn", "avx2", "avx512", "lanes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 4, 8, 12, 16, 32, 64, 256])
    args = p.parse_args(argv)
    configure_process(args.threads)  # before torch loads
    import torch

    from pdserve.engine.config import CacheConfig, EngineConfig
    from pdserve.engine.layers import cpu_kernels, linear, weight_codes
    from pdserve.engine.llm_engine import LLMEngine

    if not (cpu_kernels.load() and cpu_kernels.avx512_codes()):
        print("needs our CPU kernels and a host with AVX-512", file=sys.stderr)
        return 1
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", num_threads=args.threads,
                                    cache=CacheConfig(num_blocks=64,
                                                      enable_prefix_caching=False)))
    model = engine.executor.worker.runner.model
    weights = [m.weight for m in model.modules()
               if type(m).__name__ in ("MergedColumnLinear", "RowParallelLinear")]
    weights.append(model.lm_head.weight)
    codes = [weight_codes.codes_of(w) for w in weights]
    if any(c is None for c in codes):
        print("some weights are not block codes", file=sys.stderr)
        return 1
    lanes = [weight_codes.lanes_of(w) for w in weights]

    def one_pass(side: str, xs: dict[int, torch.Tensor]) -> float:
        if side != "onednn":
            cpu_kernels.avx512_codes(side != "avx2")
        start = time.perf_counter()
        for w, c, lane in zip(weights, codes, lanes, strict=True):
            x = xs[w.shape[1]]
            if side == "lanes":
                cpu_kernels.gemv_lanes(x, lane)
            elif side == "onednn":
                torch.ops.mkldnn._linear_pointwise(x, linear._packed_weight(w), None, "none",
                                                   [None], "")
            elif x.shape[0] <= cpu_kernels.CODES_MAX_ROWS:
                cpu_kernels.gemv_codes(x, c)
            else:
                cpu_kernels.gemm_codes(x, c)
        return time.perf_counter() - start

    best: dict[tuple[int, str], float] = {}
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for rnd in range(args.rounds):
            for rows in args.rows:
                xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
                for side in SIDES if rnd % 2 == 0 else reversed(SIDES):
                    t = one_pass(side, xs)
                    best[rows, side] = min(best.get((rows, side), t), t)
    cpu_kernels.avx512_codes(True)
    print(f"{args.threads} threads, best of {args.rounds} passes; "
          f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| rows | oneDNN ms | codes AVX2 ms | codes AVX-512 ms | lanes ms "
          "| lanes vs oneDNN | lanes vs AVX-512 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in args.rows:
        o, a, b, c = (1e3 * best[rows, s] for s in SIDES)
        print(f"| {rows} | {o:.1f} | {a:.1f} | {b:.1f} | {c:.1f} | {o / c:.2f}x "
              f"| {b / c:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
