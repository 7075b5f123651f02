"""Time to first token with a prompt's prefix loaded from the global KV store's CPU tier,
against recomputing it; and the load's bandwidth against the host->device copy rate.

One process, the real parts: a private `redis-server` (kv_store/redis_server.py; or
`--redis-url`), the node's block pool in shared memory (kv_store/node_store.py), and one
`LLMEngine` whose KV connector is the store's (kv_store/connector.py: on CUDA the pool is
pinned and a load is one batch on a copy stream). The engine's own prefix cache is off, so
a prefix can only come from the store.

Each round takes a fresh random prompt of `--prompt-len` + `--suffix-len` tokens:
1. *recomputed*: the whole prompt is prefilled (the store is asked and misses); TTFT is
   `add_request` to the first sampled token. When it ends, its blocks are saved to the
   pool (waited for, off the clock);
2. *loaded*: the same prompt again, once per `--verify` mode (`header`: each slot's hash
   and generation are checked before and after the copy; `crc`: also the CRC32 of every
   slot's bytes, before it): its first `--prompt-len` tokens come from the pool and only
   the suffix is prefilled. The connector's counters split the TTFT's store part into the
   lookup (block hashes, one index round trip, the slot checks — reported on their own as
   well) and the load (the copies into the KV pool: device time on CUDA).
Every run samples greedily, so the first tokens are compared. The pool is mapped (pinned on
CUDA) before the first round, as a worker does at start-up; its time is reported. `--warmup`
rounds of the same shape go first (kernel compilation) and are not reported.

Then the host->device copy rate of a buffer as large as one load, pinned and pageable
(torch copies timed with CUDA events), against which the load's bandwidth is put.

On the GPU machine: `python -m pdserve.bench.micro.gpu_kv_store --out gpu_kv_store.json`
(random-weight Llama-3.1-8B, bf16: a 2048-token prefix is 256 MiB of KV). A CPU smoke run:
`python -m pdserve.bench.micro.gpu_kv_store --device cpu --model random:smollm2-135m
--prompt-len 128`. A Markdown table goes to stdout, every number to the JSON file.
GB/s are 1e9 bytes per second; medians over the rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import time

import torch

from pdserve.messages import blocks_for

NODE = "bench-node"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prompt-len", type=int, default=2048,
                   help="tokens of the prefix that is stored and loaded")
    p.add_argument("--suffix-len", type=int, default=16,
                   help="tokens after the prefix, always prefilled (1..block size)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--verify", default="both", choices=("header", "crc", "both"),
                   help="the slot checks of the loaded runs (both: one loaded run each)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pool-slots", type=int, default=None,
                   help="store pool size in blocks (default: one prompt's blocks + 16)")
    p.add_argument("--shm-dir", default="/dev/shm", help="where the pool file lives")
    p.add_argument("--redis-url", default=None,
                   help="an existing Redis (default: start a private redis-server)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--out", default="gpu_kv_store.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --device cpu for a smoke run)")
    if args.prompt_len < 1 or args.prompt_len % args.block_size:
        p.error(f"--prompt-len must be a positive multiple of --block-size {args.block_size}")
    if not 1 <= args.suffix_len <= args.block_size:
        # The last token's block is never loaded: with a suffix of 1..block_size tokens the
        # loaded part is exactly the prefix.
        p.error(f"--suffix-len must be within 1..{args.block_size} (the block size)")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


# ---- set-up ----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_engine(args, connector):
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.llm_engine import LLMEngine

    tokens = args.prompt_len + args.suffix_len
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, num_threads=args.threads,
        # The engine's own prefix cache off: the loaded run's prefix can only come from
        # the store. Room for one prompt at a time (two while a save holds the last one).
        cache=CacheConfig(block_size=args.block_size,
                          num_blocks=2 * blocks_for(tokens + 1, args.block_size) + 4,
                          enable_prefix_caching=False),
        # One step prefills the whole prompt: the TTFT is one forward pass.
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=tokens,
                                  max_model_len=tokens + 16),
        enable_cuda_graphs=False,  # decode only; these requests never decode
    )
    return LLMEngine(config, kv_connector=connector)


def check_shm(shm_dir: str, nbytes: int) -> None:
    if not os.path.isdir(shm_dir):
        raise SystemExit(f"--shm-dir {shm_dir} is not a directory")
    free = shutil.disk_usage(shm_dir).free
    if free < nbytes * 1.05:
        raise SystemExit(f"the store pool needs {nbytes / 2**20:.0f} MiB but {shm_dir} has "
                         f"{free / 2**20:.0f} MiB free: pass --shm-dir on a larger tmpfs, "
                         "or fewer --pool-slots")


# ---- one request, timed ----------------------------------------------------------------------


def first_token(engine, rid: str, prompt: list[int], device: str) -> tuple[float, int]:
    """(TTFT in ms, the greedy first token) of `prompt` alone on `engine`."""
    from pdserve.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    _sync(device)
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    token = None
    while token is None:
        if not engine.has_unfinished():
            raise RuntimeError(f"{rid} finished without a token")
        for o in engine.step():
            if o.request_id == rid and o.new_token_ids:
                token = o.new_token_ids[0]
    ms = (time.perf_counter() - t0) * 1e3  # the step synced: its token is on the host
    return ms, token


def drain(engine, timeout: float = 60.0) -> None:
    """Wait until the store saved the finished requests' blocks and they are free again."""
    deadline = time.monotonic() + timeout
    while True:
        engine.release_finished_transfers()
        u = engine.usage()
        if u.free_blocks == u.total_blocks and not (u.running or u.waiting or u.held):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"saves to the store did not finish within {timeout:.0f}s: {u}")
        time.sleep(0.005)


def verify_modes(verify: str) -> tuple[str, ...]:
    return ("header", "crc") if verify == "both" else (verify,)


def one_round(engine, conn, prompt: list[int], tag: str, device: str,
              modes: tuple[str, ...]) -> dict:
    c = conn.counters
    # Saves carry CRCs when a crc run follows (a slot written without one is a crc miss).
    conn.verify = "crc" if "crc" in modes else "header"
    before = (engine.stats["prompt_tokens"], c.saved_blocks, c.save_skipped)
    recompute_ms, tok_recompute = first_token(engine, f"{tag}-recompute", prompt, device)
    computed_recompute = engine.stats["prompt_tokens"] - before[0]
    drain(engine)
    row = {"recompute_ms": recompute_ms, "prefill_tokens_recompute": computed_recompute,
           "saved_blocks": c.saved_blocks - before[1],
           "save_skipped": c.save_skipped - before[2],
           "first_token_recompute": tok_recompute, "loaded": {}}
    for mode in modes:
        conn.verify = mode
        b = (engine.stats["prompt_tokens"], c.hit_tokens, c.lookup_s, c.verify_s, c.load_s,
             c.loaded_bytes)
        loaded_ms, tok_loaded = first_token(engine, f"{tag}-loaded-{mode}", prompt, device)
        run = {
            "loaded_ms": loaded_ms,
            "prefill_tokens_loaded": engine.stats["prompt_tokens"] - b[0],
            "loaded_tokens": c.hit_tokens - b[1],
            "lookup_ms": (c.lookup_s - b[2]) * 1e3, "verify_ms": (c.verify_s - b[3]) * 1e3,
            "load_ms": (c.load_s - b[4]) * 1e3, "loaded_bytes": c.loaded_bytes - b[5],
            "first_token_loaded": tok_loaded, "first_token_equal": tok_recompute == tok_loaded,
        }
        run["load_GBps"] = run["loaded_bytes"] / run["load_ms"] / 1e6 \
            if run["load_ms"] else None
        row["loaded"][mode] = run
        drain(engine)
    return row


# ---- host->device ceilings -------------------------------------------------------------------


def h2d_rates(nbytes: int, iters: int = 10) -> dict:
    """Host->device copy rate of `nbytes` from a pinned and from a pageable buffer (median
    of `iters` copies, CUDA events)."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {"bytes": nbytes}
    for kind in ("pinned", "pageable"):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
        times = []
        for i in range(iters + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            if i >= 2:  # two warm-up copies
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        out[f"{kind}_ms"] = ms
        out[f"{kind}_GBps"] = nbytes / ms / 1e6
        del src
    return out


# ---- report ----------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    s = {k: med(r[k] for r in rows) for k in ("recompute_ms", "prefill_tokens_recompute")}
    s["loaded"] = {}
    for mode in rows[0]["loaded"]:
        runs = [r["loaded"][mode] for r in rows]
        m = {k: med(run[k] for run in runs)
             for k in ("loaded_ms", "lookup_ms", "verify_ms", "load_ms", "load_GBps",
                       "loaded_bytes", "loaded_tokens", "prefill_tokens_loaded")}
        m["speedup"] = s["recompute_ms"] / m["loaded_ms"] if m["loaded_ms"] else None
        m["first_tokens_equal"] = sum(run["first_token_equal"] for run in runs)
        s["loaded"][mode] = m
    s["rounds"] = len(rows)
    return s


def report(res: dict) -> str:
    s, args = res["summary"], res["args"]
    lines = [f"## Global KV store: prefix loaded vs recomputed ({res['device']}, {res['date']})",
             "",
             f"{args['model']} {args['dtype']}, prompt {args['prompt_len']} + "
             f"{args['suffix_len']} tokens, block {args['block_size']} "
             f"({res['block_bytes'] / 2**20:.2f} MiB a block over all layers), pool "
             f"{'pinned' if res['pool_pinned'] else 'pageable'} "
             f"({res['pool_mb']:.0f} MiB mapped in {res['pool_attach_s']:.2f}s before the "
             f"first round); median of {s['rounds']} rounds.", "",
             "| path | TTFT ms | prefill tokens computed | store lookup ms | of it slot checks ms "
             "| load ms | loaded MiB | load GB/s |", "|---|---|---|---|---|---|---|---|"]

    def cell(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines.append(f"| recomputed | {cell(s['recompute_ms'], '.1f')} | "
                 f"{cell(s['prefill_tokens_recompute'], '.0f')} | – | – | – | – | – |")
    for mode, m in s["loaded"].items():
        mib = None if m["loaded_bytes"] is None else m["loaded_bytes"] / 2**20
        lines.append(f"| prefix loaded, {mode} check | {cell(m['loaded_ms'], '.1f')} | "
                     f"{cell(m['prefill_tokens_loaded'], '.0f')} | "
                     f"{cell(m['lookup_ms'], '.2f')} | {cell(m['verify_ms'], '.2f')} | "
                     f"{cell(m['load_ms'], '.2f')} | {cell(mib, '.0f')} | "
                     f"{cell(m['load_GBps'], '.1f')} |")
    lines.append("")
    for mode, m in s["loaded"].items():
        lines.append(f"{mode} check: TTFT {cell(m['speedup'], '.2f')}x lower with the prefix "
                     f"loaded; greedy first token equal in {m['first_tokens_equal']}/"
                     f"{s['rounds']} rounds.")
    h = res.get("h2d")
    if h:
        lines += ["", f"Host->device copy of {h['bytes'] / 2**20:.0f} MiB: pinned "
                  f"{h['pinned_GBps']:.1f} GB/s, pageable {h['pageable_GBps']:.1f} GB/s. "
                  f"The load reaches {cell(res['load_share_of_pinned'], '.0%')} of the pinned "
                  f"rate ({cell(res['load_vs_pageable'], '.2f')}x the pageable one)."]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pdserve.kv_store.connector import StoreConnector
    from pdserve.kv_store.index import StoreIndex
    from pdserve.kv_store.node_store import NodeStore
    from pdserve.kv_store.redis_server import RedisServer

    server = None if args.redis_url else RedisServer().start()
    url = args.redis_url or server.url
    closers = []
    try:
        conn = StoreConnector(StoreIndex(url), NODE)
        closers.append(conn.close)
        t0 = time.perf_counter()
        engine = build_engine(args, conn)
        _sync(args.device)
        init_s = time.perf_counter() - t0
        print(f"engine up in {init_s:.1f}s", flush=True)
        tokens = args.prompt_len + args.suffix_len
        slots = args.pool_slots or blocks_for(tokens, args.block_size) + 16
        block_shape = tuple(engine.kv_cache[:, :, 0].shape)
        block_bytes = engine.layout.block_bytes
        check_shm(args.shm_dir, slots * block_bytes)
        index = StoreIndex(url)
        closers.append(index.close)
        store = NodeStore(index, NODE, slots, block_shape, args.dtype, shm_dir=args.shm_dir)
        closers.insert(0, store.close)
        t0 = time.perf_counter()
        if not conn.attach_pool():  # on CUDA its watcher may be pinning it already
            raise RuntimeError(f"the store pool at {store.path} could not be mapped")
        attach_s = time.perf_counter() - t0

        vocab = engine.model_config.vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        rows = []
        modes = verify_modes(args.verify)
        for r in range(args.warmup + args.repeats):
            prompt = torch.randint(0, vocab, (tokens,), generator=gen).tolist()
            warm = r < args.warmup
            row = one_round(engine, conn, prompt, f"{'warmup' if warm else 'round'}-{r}",
                            args.device, modes)
            print(("warm-up " if warm else "") + json.dumps(row), flush=True)
            for mode, run in row["loaded"].items():
                if run["loaded_tokens"] != args.prompt_len:
                    raise RuntimeError(
                        f"the store gave {run['loaded_tokens']} of {args.prompt_len} prefix "
                        f"tokens with the {mode} check (saved {row['saved_blocks']} blocks, "
                        f"skipped {row['save_skipped']}): is the pool large enough "
                        "(--pool-slots) and Redis up?")
            if not warm:
                rows.append({"round": r - args.warmup, **row})
        res = {"device": (torch.cuda.get_device_name() if args.device == "cuda"
                          else f"cpu ({torch.get_num_threads()} threads)"),
               "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "args": vars(args), "engine_init_s": init_s, "block_bytes": block_bytes,
               "pool_slots": slots, "pool_pinned": conn.pool_pinned,
               "pool_mb": slots * block_bytes / 2**20, "pool_attach_s": attach_s,
               "rounds": rows, "summary": summarize(rows)}
        if args.device == "cuda":
            res["h2d"] = h = h2d_rates(args.prompt_len // args.block_size * block_bytes)
            load = res["summary"]["loaded"][modes[0]]["load_GBps"]
            res["load_share_of_pinned"] = load / h["pinned_GBps"] if load else None
            res["load_vs_pageable"] = load / h["pageable_GBps"] if load else None
        res["markdown"] = report(res)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(res["markdown"])
        return res
    finally:
        for close in closers:
            close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
