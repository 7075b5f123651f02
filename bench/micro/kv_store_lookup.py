"""The global KV store's lookup on the host, by slot check: what `num_external_tokens` costs
a request whose whole prefix is in the node's pool, with `verify: header` against
`verify: crc`. No model and no GPU: the real index (a private `redis-server`, or
`--redis-url`), the real pool in shared memory, the real connector on a CPU KV pool.

One connector saves `--mb` MiB of blocks (with CRCs); another looks the prefix up
`--repeats` times per mode: block hashes, one index round trip (pin), the slot checks, then
unpin. Reported: the median lookup and, of it, the checks alone (the connector's
`verify_s`), with the checks' rate over the prefix's bytes.

    python -m pdserve.bench.micro.kv_store_lookup --mb 64

Default block: Llama-3.1-8B in bf16 (32 layers, 8 KV heads, head dim 128, block 16:
2 MiB), so 64 MiB is a 512-token prefix. GB/s are 1e9 bytes per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

NODE = "bench-lookup"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=64, help="MiB of the prefix's slots")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.mb < 1 or args.repeats < 1:
        p.error("--mb and --repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pdserve.engine.config import torch_dtype
    from pdserve.engine.kv_cache.block_hash import hash_blocks
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.sequence import FinishReason, Sequence
    from pdserve.kv_store.connector import StoreConnector
    from pdserve.kv_store.index import StoreIndex
    from pdserve.kv_store.node_store import NodeStore
    from pdserve.kv_store.redis_server import RedisServer

    dtype = torch_dtype(args.dtype)
    shape = (args.layers, 2, args.block_size, args.kv_heads, args.head_dim)
    block_bytes = torch.empty(shape, dtype=dtype).nbytes
    nblocks = max(1, (args.mb << 20) // block_bytes)
    kv = torch.randn(args.layers, 2, nblocks, *shape[2:]).to(dtype)
    tokens = list(range(nblocks * args.block_size + 1))
    key = "bench-lookup"

    def seq(rid: str) -> Sequence:
        return Sequence(rid, tokens, SamplingParams(max_tokens=1), seed=0, token_ids=tokens)

    server = None if args.redis_url else RedisServer().start()
    url = args.redis_url or server.url
    index = StoreIndex(url)
    store = NodeStore(index, NODE, nblocks, shape, args.dtype, shm_dir=args.shm_dir)
    writer = StoreConnector(StoreIndex(url), NODE, verify="crc")
    reader = StoreConnector(StoreIndex(url), NODE)
    try:
        for c in (writer, reader):
            c.register_kv_cache(kv, key)
        s = seq("save")
        s.block_ids = list(range(nblocks))
        s.block_hashes = hash_blocks(tokens[:nblocks * args.block_size], args.block_size, key)
        s.finish_reason = FinishReason.LENGTH
        writer.request_finished(s)
        deadline = time.monotonic() + 120
        while "save" not in writer.finished_transfers():
            if time.monotonic() > deadline:
                raise RuntimeError("saving the prefix to the pool did not finish")
            time.sleep(0.01)
        res = {"block_bytes": block_bytes, "blocks": nblocks,
               "prefix_MiB": nblocks * block_bytes / 2**20, "repeats": args.repeats,
               "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "modes": {}}
        for mode in ("header", "crc"):
            reader.verify = mode
            lookup, checks = [], []
            for i in range(args.repeats + 1):  # the first maps the pool: not counted
                c = reader.counters
                b = (c.lookup_s, c.verify_s)
                r = seq(f"{mode}-{i}")
                got = reader.num_external_tokens(r, 0)
                if got != nblocks * args.block_size:
                    raise RuntimeError(f"{mode}: the lookup found {got} tokens of "
                                       f"{nblocks * args.block_size}")
                reader.request_finished(r)  # unpins (nothing to save: no computed blocks)
                if i:
                    lookup.append((c.lookup_s - b[0]) * 1e3)
                    checks.append((c.verify_s - b[1]) * 1e3)
            ms = statistics.median(checks)
            res["modes"][mode] = {"lookup_ms": statistics.median(lookup), "checks_ms": ms,
                                  "checks_GBps": nblocks * block_bytes / ms / 1e6}
        print(f"KV store lookup of a {res['prefix_MiB']:.0f} MiB prefix ({nblocks} blocks of "
              f"{block_bytes / 2**20:.2f} MiB), median of {args.repeats}, {os.cpu_count()} "
              f"CPUs, load average {res['loadavg'][0]:.1f}:")
        print("| verify | lookup ms | of it slot checks ms | checks over the bytes GB/s |")
        print("|---|---|---|---|")
        for mode, m in res["modes"].items():
            print(f"| {mode} | {m['lookup_ms']:.2f} | {m['checks_ms']:.3f} | "
                  f"{m['checks_GBps']:.0f} |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return res
    finally:
        for c in (writer, reader):
            c.close()
        store.close()
        index.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
