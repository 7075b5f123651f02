"""Prefill attention on CPU: our kernel (`cpu_kernels.prefill_attention`, AVX-512 hosts)
against the torch backend's own path for the same chunk (bmm + softmax up to 1M scores,
SDPA's flash kernel past it), then whole prefills of one engine with the kernel on and off.

Part 1, a layer's attention (SmolLM2's 9 heads over 3 kv heads, 64-wide), best of 7 calls
a side, the sides alternated over rounds: ms and GFLOPS (4 * heads * d a visible score).
Part 2, one engine, prompts of `--prompt-len` unique tokens (no prefix hits), the kernel
turned on and off prompt by prompt: the prefill step's ms, median a side.

Run: `python -m pdserve.bench.micro.prefill_attention [--threads 1] [--rounds 3]
[--prompt-len 880] [--prompts 6]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pdserve.bench.micro.engine_steps import prefill_ms, random_prompt

SHAPES = ((64, 64), (16, 1000), (100, 700), (512, 512), (368, 880), (880, 880))
HEADS, KV_HEADS, D, BLOCK = 9, 3, 64, 16


def _chunk(new: int, seq_len: int):
    import torch

    from pdserve.engine.attention.torch_backend import _PrefillPlan

    used = -(-seq_len // BLOCK)
    k_cache = torch.randn(used + 4, BLOCK, KV_HEADS, D)
    v_cache = torch.randn_like(k_cache)
    ids = torch.randperm(used + 4)[:used]
    mask = None
    if new != seq_len:
        mask = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - new, seq_len)[:, None]
    plan = _PrefillPlan(0, new, seq_len, ids, mask)
    return torch.randn(new, HEADS, D), k_cache, v_cache, plan


def _best_ms(q, k_cache, v_cache, plan, calls: int = 7) -> float:
    """The torch backend's attention of one chunk, as a layer calls it: best of `calls`."""
    from pdserve.engine.attention.torch_backend import TorchAttentionBackend

    plan.table = plan.bias = None  # made per step: the first call of a step pays for them
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        TorchAttentionBackend._prefill_one(q, k_cache, v_cache, plan, D ** -0.5)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def layer_table(rounds: int) -> None:
    from pdserve.engine.layers import cpu_kernels

    print("| new tokens x context | ours ms | GFLOPS | torch path ms | GFLOPS | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for new, seq_len in SHAPES:
        q, kc, vc, plan = _chunk(new, seq_len)
        flops = 4 * HEADS * D * sum(seq_len - new + i + 1 for i in range(new))
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                cpu_kernels.set_prefill_attention_enabled(on)
                times[on].append(_best_ms(q, kc, vc, plan))
        cpu_kernels.set_prefill_attention_enabled(True)
        ours, theirs = min(times[True]), min(times[False])
        print(f"| {new} x {seq_len} | {ours:.2f} | {flops / ours / 1e6:.0f} | {theirs:.2f} | "
              f"{flops / theirs / 1e6:.0f} | {theirs / ours:.2f}x |", flush=True)


def engine_prefills(threads: int, prompt_len: int, prompts: int) -> None:
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.layers import cpu_kernels
    from pdserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model="smollm2-135m-instruct", num_threads=threads,
        cache=CacheConfig(num_blocks=512, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)))
    rng = random.Random(0)
    steps: dict[bool, list[float]] = {True: [], False: []}
    for i in range(prompts * 2 + 1):
        on = i % 2 == 1  # prompt 0 warms both paths' shapes up and is not counted
        cpu_kernels.set_prefill_attention_enabled(on)
        ms = prefill_ms(engine, f"r{i}", random_prompt(rng, prompt_len))
        if i:
            steps[on].append(ms)
    cpu_kernels.set_prefill_attention_enabled(True)
    ours, theirs = statistics.median(steps[True]), statistics.median(steps[False])
    print(f"\n{prompt_len}-token prefill, {threads} thread(s), 512 tokens a step, median of "
          f"{prompts} a side: ours {ours:.0f} ms, torch path {theirs:.0f} ms "
          f"({theirs / ours:.2f}x)")
    print("  ours:", " ".join(f"{x:.0f}" for x in steps[True]))
    print("  torch path:", " ".join(f"{x:.0f}" for x in steps[False]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=880)
    p.add_argument("--prompts", type=int, default=6)
    args = p.parse_args(argv)
    from pdserve.engine.cpu_threads import configure_process

    configure_process(args.threads)  # before torch loads
    from pdserve.engine.layers import cpu_kernels

    if not cpu_kernels.prefill_attention_on():
        print("our prefill attention does not run on this host (needs AVX-512)")
        return 1
    layer_table(args.rounds)
    engine_prefills(args.threads, args.prompt_len, args.prompts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
