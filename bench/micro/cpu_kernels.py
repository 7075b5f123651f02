"""Our CPU kernels (`engine.layers.cpu_kernels`) against torch's ops, one process,
interleaved: the matmuls of one decode step, and whole decode steps of the engine.

- *products*: every weight a decode step multiplies (the model's projections and its LM
  head, as loaded), each once per pass, with 1, 2, 4 and 8 rows, through oneDNN and through
  our GEMV: ms a pass and the rate the weights stream at;
- *steps*: our engine decoding `batch` sequences, median ms of a decode step with torch's
  ops (oneDNN matmuls, reference layers, gather + SDPA attention), with our GEMV and paged
  decode attention under the reference layers, and with those and the fused glue
  (`engine.models.fused_llama` on CPU: the default);
- *prefill steps*: the engine step that computes a new prompt of `prefill` tokens while
  `beside` other sequences decode (the step a request's first token waits for), with every
  product of more than 16 rows through oneDNN over float32 and through our GEMM over the
  block codes.

Every side runs our kernels wherever they can take a product (`cpu_kernels.AVX2_ROUTING`),
whatever the host's own routing would choose, so the kernels are measured on any host.
Rounds alternate the sides cell by cell, so drift from other processes falls on all.
The process gets a worker's thread settings first (`engine.cpu_threads`: passive waiting).

Run: `python -m pdserve.bench.micro.cpu_kernels [--threads 2] [--rounds 3] [--json F]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from pdserve.engine.cpu_threads import configure_process

MODEL = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", default="1,2,4,8", help="rows of the product passes")
    p.add_argument("--batches", default="1,4,8", help="batch sizes of the decode steps")
    p.add_argument("--steps", type=int, default=12, help="decode steps timed per cell")
    p.add_argument("--prefills", default="64,512", help="prompt tokens of the prefill steps")
    p.add_argument("--beside", default="0,12", help="decoding sequences beside the prompt")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_process(args.threads)  # before torch loads
    import torch

    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.layers import cpu_kernels, linear
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.models.fused_llama import set_fused_kernels

    if not cpu_kernels.load():
        print("our CPU kernels cannot run on this host", file=sys.stderr)
        return 1
    cpu_kernels.set_routing(cpu_kernels.AVX2_ROUTING)  # ours wherever they can take a product
    load_before = os.getloadavg()
    engine = LLMEngine(EngineConfig(
        model=MODEL, num_threads=args.threads,
        cache=CacheConfig(num_blocks=512, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)))
    model = engine.executor.worker.runner.model
    weights = [m.weight for m in model.modules()
               if type(m).__name__ in ("MergedColumnLinear", "ColumnParallelLinear",
                                       "RowParallelLinear")]
    weights.append(model.lm_head.weight)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    rows_list = [int(r) for r in args.rows.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    # (our kernels, weights read as block codes where found)
    sides = {"onednn": (False, False), "ours": (True, False), "codes": (True, True)}
    # (our kernels, fused glue, block codes)
    step_sides = {"torch": (False, False, False), "kernels": (True, False, False),
                  "all": (True, True, False), "codes": (True, True, True)}
    products: dict[str, dict[int, list[float]]] = {s: {r: [] for r in rows_list} for s in sides}
    steps: dict[str, dict[int, list[float]]] = {s: {b: [] for b in batches} for s in step_sides}
    prefill_cells = [(int(p), int(b)) for p in args.prefills.split(",") if p
                     for b in args.beside.split(",") if b]
    # products of more than 16 rows: (block codes read by our GEMM)
    prefill_sides = {"onednn": False, "codes": True}
    prefills: dict[str, dict[tuple[int, int], list[float]]] = {
        s: {c: [] for c in prefill_cells} for s in prefill_sides}
    counter = iter(range(1 << 30))

    def product_pass(rows: int) -> float:
        xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        with torch.inference_mode():
            for w in weights:  # warm: oneDNN's packed copies exist before timing
                linear.dense(xs[w.shape[1]], w)
            t = time.perf_counter()
            for w in weights:
                linear.dense(xs[w.shape[1]], w)
        return time.perf_counter() - t

    def decode_steps(batch: int) -> list[float]:
        n = args.steps + 1
        for i in range(batch):
            prompt = [(7 + 31 * i + 13 * j) % 4000 + 10 for j in range(32)]
            engine.add_request(f"r{next(counter)}", prompt, SamplingParams(
                temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True))
        while engine.scheduler.waiting:
            engine.step()
        times = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        return times

    def prefill_step(prompt_len: int, beside: int) -> float:
        ids = [f"r{next(counter)}" for _ in range(beside)]
        for i, rid in enumerate(ids):
            prompt = [(11 + 17 * i + 5 * j) % 4000 + 10 for j in range(32)]
            engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=64,
                                                           ignore_eos=True))
        while engine.scheduler.waiting or any(
                s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
            engine.step()
        rid = f"r{next(counter)}"
        ids.append(rid)
        start = next(counter)
        engine.add_request(rid, [(start * 7 + 3 * j) % 4000 + 10 for j in range(prompt_len)],
                           SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        engine.step()
        took = time.perf_counter() - t
        for rid in ids:
            engine.abort(rid)
        return took

    for rnd in range(args.rounds):
        order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
        for rows in rows_list:
            for side in order:
                cpu_kernels.set_enabled(sides[side][0])
                cpu_kernels.set_codes_enabled(sides[side][1])
                products[side][rows].append(product_pass(rows))
        step_order = list(step_sides) if rnd % 2 == 0 else list(reversed(step_sides))
        for batch in batches:
            for side in step_order:
                gemv_on, fused_on, codes_on = step_sides[side]
                cpu_kernels.set_enabled(gemv_on)
                cpu_kernels.set_codes_enabled(codes_on)
                set_fused_kernels(model, fused_on, "cpu")
                steps[side][batch].append(statistics.median(decode_steps(batch)))
        cpu_kernels.set_enabled(True)
        set_fused_kernels(model, True, "cpu")
        for cell in prefill_cells:
            for side in (prefill_sides if rnd % 2 == 0 else reversed(prefill_sides)):
                cpu_kernels.set_codes_enabled(True)
                cpu_kernels.set_gemm_codes_enabled(prefill_sides[side])
                prefills[side][cell].append(prefill_step(*cell))
        cpu_kernels.set_gemm_codes_enabled(True)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    cpu_kernels.set_enabled(True)
    cpu_kernels.set_codes_enabled(True)
    res = {
        "threads": args.threads, "weights_mb": nbytes / 1e6,
        "load_before": load_before, "load_after": os.getloadavg(),
        "products_ms": {s: {r: 1e3 * statistics.median(v) for r, v in d.items()}
                        for s, d in products.items()},
        "step_ms": {s: {b: 1e3 * statistics.median(v) for b, v in d.items()}
                    for s, d in steps.items()},
        "prefill_step_ms": {s: {f"{p}+{b}": 1e3 * statistics.median(v)
                                for (p, b), v in d.items()} for s, d in prefills.items()},
    }
    print(render(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


def render(res: dict) -> str:
    p, s = res["products_ms"], res["step_ms"]
    lines = [f"{res['threads']} threads, {res['weights_mb']:.0f} MB of weights a step; "
             f"load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}",
             "| what | oneDNN ms | ours ms | ours, codes ms | oneDNN GB/s | ours GB/s | "
             "speed-up | with codes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    mb = res["weights_mb"]  # float32 bytes: what the weights would cost without codes
    for rows in p["ours"]:
        a, b, c = p["onednn"][rows], p["ours"][rows], p["codes"][rows]
        lines.append(f"| products, {rows} rows | {a:.1f} | {b:.1f} | {c:.1f} | {mb / a:.1f} | "
                     f"{mb / b:.1f} | {a / b:.2f}x | {a / c:.2f}x |")
    lines += ["", "| decode step | torch ops ms | GEMV + attention ms | + fused glue ms | "
              "+ block codes ms | speed-up | with codes |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for batch in s["torch"]:
        a, b, c, d = (s[k][batch] for k in ("torch", "kernels", "all", "codes"))
        lines.append(f"| batch {batch} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} | {a / c:.2f}x | "
                     f"{a / d:.2f}x |")
    pre = res.get("prefill_step_ms", {})
    if pre.get("onednn"):
        lines += ["", "| prefill step (prompt + decoding beside) | oneDNN float32 ms | "
                  "codes GEMM ms | speed-up |", "| --- | ---: | ---: | ---: |"]
        for cell, a in pre["onednn"].items():
            b = pre["codes"][cell]
            prompt, beside = cell.split("+")
            lines.append(f"| {prompt} tokens + {beside} decoding | {a:.1f} | {b:.1f} | "
                         f"{a / b:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
