"""What publishing a worker's prefix cache (kv_store/cache_events.py) costs its engine.

Two measurements, each alternating off and on so that noise from other processes falls on
both sides alike:

- **decode steps**: 16 sequences of 40-token prompts decoding 96 tokens each (prefix
  caching on, a 300-block pool, so every 16th token of a sequence commits a block and the
  pool evicts across repeats), each step timed, without and with a `CachePublisher`
  subscribed and publishing to a real redis-server every 50 ms;
- **per block**: allocate + commit + free of one block in a full `BlockManager` (one
  `stored` and one `evicted` event), without a listener and with the publisher's: what the
  engine thread pays, timed between the publisher's writes (one per 1000 blocks, untimed).

Run: `python -m pdserve.bench.micro.cache_events [--threads 1] [--repeats 5]` (needs
redis-server on the PATH).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=5, help="decode runs per side")
    p.add_argument("--blocks", type=int, default=100_000, help="blocks per per-block run")
    return p.parse_args(argv)


def decode_steps(engine, tag: str) -> list[float]:
    """Seconds of each decode step of one run (the first two steps prefill)."""
    from pdserve.engine.sampling_params import SamplingParams

    for i in range(16):
        rng = random.Random(f"{tag}-{i}")
        prompt = [rng.randrange(100, 30000) for _ in range(40)]
        engine.add_request(f"{tag}-{i}", prompt,
                           SamplingParams(max_tokens=96, min_tokens=96, temperature=0))
    steps = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    return steps[2:]


def per_block_ns(subscribe, drain, n: int, batch: int = 1000) -> float:
    """Engine-thread nanoseconds per block; `drain` runs untimed after every `batch` blocks
    (the publisher's write of them, as its thread would every interval)."""
    from pdserve.engine.kv_cache.block_manager import BlockManager

    bm = BlockManager(512, 16)
    subscribe(bm)
    total = 0.0
    for start in range(0, n, batch):
        t = time.perf_counter()
        for i in range(start, start + batch):
            (b,) = bm.allocate(1)  # evicts the least recently used cached block once full
            bm.commit_hash(b, i.to_bytes(16, "little"))
            bm.free([b])
        total += time.perf_counter() - t
        drain()
    return total / n * 1e9


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from pdserve.engine.llm import LLM
    from pdserve.kv_store.cache_events import CachePublisher
    from pdserve.kv_store.index import StoreIndex
    from pdserve.kv_store.redis_server import RedisServer

    server = RedisServer().start()
    try:
        engine = LLM(block_size=16, num_blocks=300, max_num_seqs=16,
                     max_num_batched_tokens=1024).engine
        decode_steps(engine, "warm-up")
        steps: dict[str, list[list[float]]] = {"off": [], "on": []}
        for rep in range(args.repeats):
            for side in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                if side == "off":
                    steps[side].append(decode_steps(engine, f"{side}{rep}"))
                    continue
                pub = CachePublisher(StoreIndex(server.url), "bench")
                unsubscribe = engine.subscribe_cache_events(pub.on_event)
                steps[side].append(decode_steps(engine, f"{side}{rep}"))
                unsubscribe()
                pub.close()
        blocks: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(3):
            blocks["off"].append(per_block_ns(lambda bm: None, lambda: None, args.blocks))
            pub = CachePublisher(StoreIndex(server.url), "bench", interval_s=60, ttl_s=600)
            blocks["on"].append(per_block_ns(
                lambda bm, pub=pub: bm.prefix_cache.subscribe(pub.on_event), pub.flush,
                args.blocks))
            pub.close()
    finally:
        server.stop()
    print(f"load average {os.getloadavg()[0]:.1f}, torch threads {args.threads}")
    print("| publisher | decode steps | median ms | mean ms | median ms of each run "
          "| per block (2 events) ns |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side in ("off", "on"):
        ms = [s * 1e3 for run in steps[side] for s in run]
        runs = " ".join(f"{statistics.median(run) * 1e3:.0f}" for run in steps[side])
        print(f"| {side} | {len(ms)} | {statistics.median(ms):.2f} | "
              f"{statistics.fmean(ms):.2f} | {runs} | {statistics.median(blocks[side]):.0f} |")
    return {"steps": steps, "per_block_ns": blocks}


if __name__ == "__main__":
    main()
