"""KV handoff between two GPUs: raw CuPy NCCL send/recv against our `nccl` transport.

Run on the GPU machine, in one command: `python -m bench.gpu_handoff --out handoff.json`.

Two processes, GPU 0 the prefill side and GPU 1 the decode side, as Ray actors would be:

1. **raw**: one CuPy NCCL send/recv of 1/4/16/64/256 MiB, back to back, timed by the
   receiver (the data has landed when its stream is done);
2. **transport**: a 2048-token prompt's KV in Llama-3.1-8B shape (32 layers, 8 KV heads,
   head dim 128, bf16, block 16: 128 blocks, 256 MiB) from `open` on the prefill side to
   `wait` returning COMPLETE on the decode side (one host clock: both processes share the
   machine), announce round trip included, with contiguous block ids, with scattered
   source ids into a contiguous reservation (what `BlockManager.allocate_contiguous` gives
   the decode side), and scattered on both sides, as GB/s and as a fraction of raw at the
   same total size;
3. **overlap**: the same transfer while each layer is "computed" first (bf16 matmuls of
   about the 8B model's per-layer FLOPs at 2048 tokens), against the compute alone: what
   disaggregation adds to the time to first token.

GB/s are 1e9 bytes per second. Medians of the repeats; the machine is shared, so compare
only figures taken in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import time
import traceback

import torch
import torch.multiprocessing as mp

from engine.kv_cache.layout import KVLayout
from kv_transfer.nccl_wire import block_runs

SIZES_MIB = (1, 4, 16, 64, 256)
LAYERS, KV_HEADS, HEAD_DIM, BLOCK, TOKENS = 32, 8, 128, 16, 2048
NBLK = TOKENS // BLOCK
POOL_BLOCKS = 2 * NBLK + 16  # room for scattered ids
KEY = "bench-llama-3.1-8b"
VARIANTS = ("contiguous", "src-scattered", "scattered")
P_GPU, D_GPU = 0, 1


def _layout() -> KVLayout:
    return KVLayout(LAYERS, KV_HEADS, HEAD_DIM, BLOCK, "bfloat16")


def _raw(rank: int, uid, sizes: list[int], barrier) -> dict:
    """Back-to-back send (rank 0) / recv (rank 1) of each size; elapsed seconds per op."""
    import cupy
    from cupy.cuda import nccl

    from kv_transfer.nccl_device import new_communicator

    gpu = P_GPU if rank == 0 else D_GPU
    with cupy.cuda.Device(gpu):
        comm = new_communicator(nccl, uid, rank)
    stream = torch.cuda.Stream()
    buf = torch.empty(max(sizes) << 20, dtype=torch.uint8, device=f"cuda:{gpu}")
    op = comm.send if rank == 0 else comm.recv
    out = {}
    for mib in sizes:
        n = mib << 20
        iters = max(10, min(200, (1 << 30) // n))
        times = []
        for _ in range(3):
            op(buf.data_ptr(), n, nccl.NCCL_UINT8, 1 - rank, stream.cuda_stream)
            stream.synchronize()
            barrier.wait()
            t0 = time.perf_counter()
            for _ in range(iters):
                op(buf.data_ptr(), n, nccl.NCCL_UINT8, 1 - rank, stream.cuda_stream)
            stream.synchronize()
            times.append((time.perf_counter() - t0) / iters)
        out[mib] = statistics.median(times)
    # The transport's message structure at the prompt's size: one group a layer of K and V
    # (4 MiB each), 32 layers; how much of the gap to raw is NCCL's per-message cost.
    n = (max(sizes) << 20) // (2 * LAYERS)
    times = []
    for _ in range(5):
        barrier.wait()
        t0 = time.perf_counter()
        for _ in range(LAYERS):
            nccl.groupStart()
            op(buf.data_ptr(), n, nccl.NCCL_UINT8, 1 - rank, stream.cuda_stream)
            op(buf.data_ptr() + n, n, nccl.NCCL_UINT8, 1 - rank, stream.cuda_stream)
            nccl.groupEnd()
        stream.synchronize()
        times.append(time.perf_counter() - t0)
    out["layered"] = statistics.median(times[1:])
    return out


def _plan(variant: str, it: int) -> tuple[list[int], list[int]]:
    """(source ids, destination ids) of one repeat."""
    if variant == "contiguous":
        return list(range(NBLK)), list(range(8, 8 + NBLK))
    rng = random.Random(it)
    if variant == "src-scattered":
        return rng.sample(range(POOL_BLOCKS), NBLK), list(range(8, 8 + NBLK))
    return rng.sample(range(POOL_BLOCKS), NBLK), rng.sample(range(POOL_BLOCKS), NBLK)


def _prefill(args, q_uid, q_sink, q_res, barrier) -> None:
    try:
        from cupy.cuda import nccl

        from kv_transfer import KVSink
        from kv_transfer.nccl_transport import NcclKVSender

        torch.cuda.set_device(P_GPU)
        uid = [int(b) & 0xFF for b in nccl.get_unique_id()]
        q_uid.put(uid)
        res: dict = {"raw": _raw(0, uid, list(SIZES_MIB), barrier)}
        shape = (LAYERS, 2, POOL_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
        pool = torch.randn(shape, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)
        tx = NcclKVSender(pool, KEY)
        uid = tx.unique_id()
        q_uid.put(uid)
        tx.connect("decode-0", uid, 0)

        def transfer(compute=None) -> tuple[float, float, float]:
            sink, src = q_sink.get(timeout=120)
            t0 = time.time()
            h = tx.open(KVSink.from_dict(sink), src)
            for layer in range(LAYERS):
                if compute:
                    compute()
                h.send_layer(layer)
            torch.cuda.current_stream().synchronize()
            t_compute = time.time()
            h.finish(30)
            return t0, t_compute, h.announce_s

        for variant in VARIANTS:
            res[variant] = [transfer() for _ in range(args.warmup + args.repeats)]
        x = torch.randn(TOKENS, 4096, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)
        w = torch.randn(4096, 14336, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)
        y = torch.empty(TOKENS, 14336, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)

        def layer() -> None:  # 4 x 2*2048*4096*14336 ~ 0.96 TFLOP ~ one 8B layer at 2k tokens
            for _ in range(4):
                torch.matmul(x, w, out=y)

        colocated = []
        for _ in range(args.warmup + args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(LAYERS):
                layer()
            torch.cuda.synchronize()
            colocated.append(time.perf_counter() - t0)
        res["colocated_s"] = colocated
        res["overlap"] = [transfer(layer) for _ in range(args.warmup + args.repeats)]
        tx.close()
        q_res.put(("prefill", res))
    except BaseException:
        q_res.put(("prefill", {"error": traceback.format_exc()}))


def _decode(args, q_uid, q_sink, q_res, barrier) -> None:
    try:
        from kv_transfer import TransferStatus
        from kv_transfer.nccl_transport import NcclKVReceiver

        torch.cuda.set_device(D_GPU)
        res: dict = {"raw": _raw(1, q_uid.get(timeout=120), list(SIZES_MIB), barrier)}
        pool = _layout().allocate(POOL_BLOCKS, f"cuda:{D_GPU}")
        rx = NcclKVReceiver(pool, KEY, name="decode-0")
        rx.connect("prefill-0", q_uid.get(timeout=120), 1)
        n = 0

        def transfer(variant: str, it: int) -> float:
            nonlocal n
            src, dst = _plan(variant, it)
            rid = f"r{n}"
            n += 1
            q_sink.put((rx.expect(rid, dst, TOKENS, time.time() + 60).to_dict(), src))
            state = rx.wait(rid, 30)
            t_done = time.time()
            if state is not TransferStatus.COMPLETE:
                raise RuntimeError(f"{rid}: {state} {rx.error(rid)}")
            rx.cancel(rid)
            return t_done

        for variant in VARIANTS:
            res[variant] = [transfer(variant, i) for i in range(args.warmup + args.repeats)]
        res["overlap"] = [transfer("contiguous", i) for i in range(args.warmup + args.repeats)]
        rx.close()
        q_res.put(("decode", res))
    except BaseException:
        q_res.put(("decode", {"error": traceback.format_exc()}))


def _summarise(args, p: dict, d: dict) -> dict:
    kv_bytes = _layout().block_bytes * NBLK
    raw = {mib: {"bytes": mib << 20, "s": d["raw"][mib],
                 "GB/s": (mib << 20) / d["raw"][mib] / 1e9} for mib in SIZES_MIB}
    raw_at_size = raw[max(SIZES_MIB)]["GB/s"]  # 256 MiB == the prompt's KV
    layered = (max(SIZES_MIB) << 20) / d["raw"]["layered"] / 1e9
    out = {"raw": raw, "raw_layered_GB/s": layered, "kv_bytes": kv_bytes, "transport": {}}
    skip = args.warmup
    for variant in VARIANTS:
        spans = [t_done - t0 for (t0, _, _), t_done in zip(p[variant], d[variant])][skip:]
        s = statistics.median(spans)
        out["transport"][variant] = {
            "s": s, "GB/s": kv_bytes / s / 1e9, "fraction_of_raw": kv_bytes / s / 1e9 / raw_at_size,
            "runs": len(block_runs(_plan(variant, 0)[1])),
            "announce_s": statistics.median(a for _, _, a in p[variant][skip:])}
    colocated = statistics.median(p["colocated_s"][skip:])
    ttft = [t_done - t0 for (t0, _, _), t_done in zip(p["overlap"], d["overlap"])][skip:]
    compute = [tc - t0 for t0, tc, _ in p["overlap"]][skip:]
    out["overlap"] = {"colocated_s": colocated, "disaggregated_s": statistics.median(ttft),
                      "compute_while_sending_s": statistics.median(compute),
                      "added_fraction": statistics.median(ttft) / colocated - 1}
    return out


def _table(r: dict) -> str:
    lines = ["| what | size | time | GB/s | of raw |", "|---|---|---|---|---|"]
    for mib, v in r["raw"].items():
        lines.append(f"| raw CuPy NCCL send/recv | {mib} MiB | {v['s'] * 1e3:.3f} ms | "
                     f"{v['GB/s']:.1f} | |")
    size = f"{r['kv_bytes'] / (1 << 20):.0f} MiB"
    top = r["raw"][max(SIZES_MIB)]["GB/s"]
    lines.append(f"| raw, as 32 groups of 2 x 4 MiB (the transport's messages) | {size} | | "
                 f"{r['raw_layered_GB/s']:.1f} | {r['raw_layered_GB/s'] / top:.0%} |")
    for variant, v in r["transport"].items():
        lines.append(f"| transport, 2048-token 8B KV, {variant} ({v['runs']} runs; announce "
                     f"{v['announce_s'] * 1e3:.2f} ms) | {size} | {v['s'] * 1e3:.3f} ms | "
                     f"{v['GB/s']:.1f} | {v['fraction_of_raw']:.0%} |")
    o = r["overlap"]
    lines += ["", "| layer-wise overlap (8B-sized matmuls, 32 layers) | time |", "|---|---|",
              f"| compute alone (colocated TTFT proxy) | {o['colocated_s'] * 1e3:.2f} ms |",
              f"| compute + send, until decode COMPLETE | {o['disaggregated_s'] * 1e3:.2f} ms |",
              f"| compute alone while sending | {o['compute_while_sending_s'] * 1e3:.2f} ms |",
              f"| added by disaggregation | {o['added_fraction']:+.1%} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 CUDA devices")
    ctx = mp.get_context("spawn")
    q_uid, q_sink, q_res = ctx.Queue(), ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=f, args=(args, q_uid, q_sink, q_res, barrier))
             for f in (_prefill, _decode)]
    for proc in procs:
        proc.start()
    got: dict = {}
    try:
        while len(got) < len(procs):
            role, res = q_res.get(timeout=600)
            got[role] = res
            if "error" in res:  # the other side would wait for it until its own timeout
                raise SystemExit(f"{role} failed:\n{res['error']}")
    finally:
        failed = any("error" in res for res in got.values())
        for proc in procs:
            proc.join(timeout=1 if failed else 30)
            if proc.is_alive():
                proc.kill()
    result = _summarise(args, got["prefill"], got["decode"])
    from cupy.cuda import nccl

    result["env"] = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                     "torch": torch.__version__, "nccl": nccl.get_version(),
                     "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(f"{result['env']}\n\n{_table(result)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
