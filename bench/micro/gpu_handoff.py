"""KV handoff between two GPUs: raw CuPy NCCL send/recv against our `nccl` transport.

Run on the GPU machine, in one command:
`python -m pdserve.bench.micro.gpu_handoff --out handoff.json`
(add `--sweep` to repeat the core figures under a few NCCL tunings, each in fresh processes:
NCCL reads its environment once, when a process makes its first communicator).

Two processes, GPU 0 the prefill side and GPU 1 the decode side, as Ray actors would be:

1. **raw**: CuPy NCCL send/recv of 1/4/16/64/256 MiB, back to back; and the transport's
   call pattern for the prompt below, back to back: 64 calls of 4 MiB (each layer's K and
   V) and the 32-byte trailer, grouped a layer at a time on the sending side (`send_layer`
   when layers come a forward pass apart; back-to-back layers are batched, see
   nccl_transport.HOLD_S) and in growing groups of 2, 4, 8, ... on the receiving side (what
   the decode side posts); and the same calls in one group on each side. Timed by the
   receiver, on the host clock (and on its stream's CUDA events);
2. **transport**: a 2048-token prompt's KV in Llama-3.1-8B shape (32 layers, 8 KV heads,
   head dim 128, bf16, block 16: 128 blocks, 256 MiB) from `open` on the prefill side to
   `wait` returning COMPLETE on the decode side (one host clock: both processes share the
   machine), announce included, with contiguous block ids, with scattered source ids into
   a contiguous reservation (what `BlockManager.allocate_contiguous` gives the decode side),
   and scattered on both sides. Also the data path alone: CUDA timing events around the
   sends on the prefill side's pair stream and around the receives on the decode side's
   link stream (option `timing`); the side that started later saw only the data moving,
   so the smaller of the two is the data-path time. Each as GB/s and as a fraction of
   raw 256 MiB in one message and of raw in the transport's call pattern;
3. **overlap**: the same transfer while each layer is "computed" first (bf16 matmuls of
   about the 8B model's per-layer FLOPs at 2048 tokens), against the compute alone: what
   disaggregation adds to the time to first token.

`--sweep` runs, per tuning (SWEEP, or `--sweep "name:K=V,K=V;name2:..."`), raw 256 MiB, both
raw patterns, the contiguous transfer and the overlap. A sweep entry named `register` is raw
only, with NCCL user buffer registration of the raw buffers (ncclCommRegister through
ctypes, legacy cudaMalloc IPC: NCCL_LEGACY_CUDA_REGISTER=1): a probe of zero-copy
send/recv, not something the transport does (on 2026-11-22 its receiver never finished).
Each process's NCCL INIT lines about channels and chunk sizes are kept in the JSON.

With the transport's `timing` option on, the host timeline of each transfer (announce
written, first/last launch on the prefill side; announce read, receives posted, trailer
seen, request settled, `wait` returned on the decode side) is reported as median ms after
`open`.

GB/s are 1e9 bytes per second. Medians of the repeats; the machine is shared, so compare
only figures taken in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import random
import signal
import statistics
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp

from pdserve.engine.kv_cache.layout import KVLayout
from pdserve.kv_transfer.nccl_wire import TRAILER_LEN, block_runs

SIZES_MIB = (1, 4, 16, 64, 256)
LAYERS, KV_HEADS, HEAD_DIM, BLOCK, TOKENS = 32, 8, 128, 16, 2048
NBLK = TOKENS // BLOCK
POOL_BLOCKS = 2 * NBLK + 16  # room for scattered ids
KEY = "bench-llama-3.1-8b"
VARIANTS = ("contiguous", "src-scattered", "scattered")
P_GPU, D_GPU = 0, 1
MIB = 1 << 20
KV_MSG = 256 * MIB // (2 * LAYERS)  # one layer's K (or V) of the prompt: 4 MiB
TRAILER_BYTES = TRAILER_LEN * 8
# Point-to-point knobs worth a look on NVLink (kv_transfer/nccl_device.NCCL_TUNABLES).
SWEEP = (
    ("chunk128k", "P2P_NVL_CHUNKSIZE=131072"),
    ("chunk1m", "P2P_NVL_CHUNKSIZE=1048576"),
    ("p2pch32", "MIN_P2P_NCHANNELS=32"),
    ("p2pch64", "MIN_P2P_NCHANNELS=64,MAX_P2P_NCHANNELS=64"),
    ("p2pch64-chunk256k", "MIN_P2P_NCHANNELS=64,MAX_P2P_NCHANNELS=64,P2P_NVL_CHUNKSIZE=262144"),
    ("read", "P2P_READ_ENABLE=1"),
)


def _layout() -> KVLayout:
    return KVLayout(LAYERS, KV_HEADS, HEAD_DIM, BLOCK, "bfloat16")


# ---- per process setup --------------------------------------------------------------------------


def _setup(cfg: dict, role: str) -> None:
    """Before any NCCL call in this process: tuning, and NCCL's INIT log to a file."""
    from pdserve.kv_transfer.nccl_device import apply_nccl_tuning

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ["NCCL_DEBUG"] = "INFO"
    os.environ["NCCL_DEBUG_SUBSYS"] = "INIT,ENV"
    os.environ["NCCL_DEBUG_FILE"] = f"/tmp/pdserve_handoff_{cfg['name']}_{role}.%p.log"
    if cfg.get("register"):
        os.environ["NCCL_LEGACY_CUDA_REGISTER"] = "1"  # registration of cudaMalloc memory
    apply_nccl_tuning(cfg["tuning"])


def _nccl_info(cfg: dict, role: str) -> list[str]:
    keep = ("p2p channels", "Chunksize", "set by environment", "NCCL version", "via P2P")
    lines: list[str] = []
    for path in glob.glob(f"/tmp/pdserve_handoff_{cfg['name']}_{role}.{os.getpid()}.log"):
        with open(path, errors="replace") as f:
            for line in f:
                if any(k in line for k in keep) and line not in lines:
                    lines.append(line.strip()[-200:])
    seen, out = set(), []
    for line in lines:  # "Channel 05/0 : ... via P2P/..." comes once a channel: keep one
        key = line.split("via")[-1] if "via P2P" in line else line
        if key not in seen:
            seen.add(key)
            out.append(line)
    return out[:20]


def _register(comm, t: torch.Tensor) -> str:
    """ncclCommRegister `t` with CuPy's communicator (zero-copy p2p); "" or why not."""
    import ctypes

    try:
        from cupy_backends.cuda.libs import nccl as cupy_nccl

        # dlsym through CuPy's NCCL module finds the libnccl that CuPy itself calls
        fn = ctypes.CDLL(cupy_nccl.__file__).ncclCommRegister
    except (ImportError, OSError, AttributeError):
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "libnccl.so" in ln})
        if not paths:
            return "libnccl not found"
        fn = ctypes.CDLL(paths[0]).ncclCommRegister
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.POINTER(ctypes.c_void_p)]
    fn.restype = ctypes.c_int
    handle = ctypes.c_void_p()
    rc = fn(ctypes.c_void_p(comm.comm), ctypes.c_void_p(t.data_ptr()),
            ctypes.c_size_t(t.numel() * t.element_size()), ctypes.byref(handle))
    return "" if rc == 0 else f"ncclCommRegister returned {rc}"


# ---- raw CuPy NCCL ------------------------------------------------------------------------------


def _raw(rank: int, uid, cfg: dict, barrier) -> dict:
    """Receiver-timed back-to-back sends (rank 0) / receives (rank 1): seconds per op."""
    import cupy
    from cupy.cuda import nccl

    from pdserve.kv_transfer.nccl_device import group_sizes, new_communicator

    gpu = P_GPU if rank == 0 else D_GPU
    with cupy.cuda.Device(gpu):
        comm = new_communicator(nccl, uid, rank)
    stream = torch.cuda.Stream()
    buf = torch.empty(max(cfg["sizes"]) * MIB + 4096, dtype=torch.uint8, device=f"cuda:{gpu}")
    out: dict = {"registered": _register(comm, buf) if cfg.get("register") else None}
    op = comm.send if rank == 0 else comm.recv
    base, peer, s, u8 = buf.data_ptr(), 1 - rank, stream.cuda_stream, nccl.NCCL_UINT8

    def timed(run, iters: int, rounds: int) -> tuple[float, float]:
        """(host seconds, GPU seconds) per call of `run`, median over `rounds`."""
        run()
        stream.synchronize()
        host, gpu_s = [], []
        for _ in range(rounds):
            barrier.wait()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record(stream)
            for _ in range(iters):
                run()
            end.record(stream)
            stream.synchronize()
            host.append((time.perf_counter() - t0) / iters)
            gpu_s.append(start.elapsed_time(end) / 1e3 / iters)
        return statistics.median(host), statistics.median(gpu_s)

    for mib in cfg["sizes"]:
        n = mib * MIB
        out[mib] = timed(lambda n=n: op(base, n, u8, peer, s),
                         max(10, min(200, (1 << 30) // n)), 3)

    trailer = base + max(cfg["sizes"]) * MIB

    calls = [(base + i * KV_MSG, KV_MSG) for i in range(2 * LAYERS)] + [(trailer, TRAILER_BYTES)]

    def pattern(fused: bool) -> None:
        # The transport's calls for one 2048-token request: per layer K then V (4 MiB), then
        # the trailer; the sender groups a layer at a time (send_layer, when layers come a
        # forward pass apart), the receiver posts them all in growing groups (group_sizes).
        if rank == 1 or fused:
            at = 0
            for size in group_sizes(len(calls), len(calls) if fused else 2):
                nccl.groupStart()
                for ptr, n in calls[at:at + size]:
                    op(ptr, n, u8, peer, s)
                nccl.groupEnd()
                at += size
            return
        for layer in range(LAYERS):
            nccl.groupStart()
            op(base + 2 * layer * KV_MSG, KV_MSG, u8, peer, s)
            op(base + (2 * layer + 1) * KV_MSG, KV_MSG, u8, peer, s)
            if layer == LAYERS - 1:
                op(trailer, TRAILER_BYTES, u8, peer, s)
            nccl.groupEnd()

    out["pattern"] = timed(lambda: pattern(False), 10, 5)
    out["pattern_fused"] = timed(lambda: pattern(True), 10, 5)
    return out


# ---- the transport ------------------------------------------------------------------------------


def _plan(variant: str, it: int) -> tuple[list[int], list[int]]:
    """(source ids, destination ids) of one repeat."""
    if variant == "contiguous":
        return list(range(NBLK)), list(range(8, 8 + NBLK))
    rng = random.Random(it)
    if variant == "src-scattered":
        return rng.sample(range(POOL_BLOCKS), NBLK), list(range(8, 8 + NBLK))
    return rng.sample(range(POOL_BLOCKS), NBLK), rng.sample(range(POOL_BLOCKS), NBLK)


def _prefill(cfg, q_uid, q_sink, q_res, barrier) -> None:
    try:
        _setup(cfg, "prefill")
        from cupy.cuda import nccl

        from pdserve.kv_transfer import KVSink
        from pdserve.kv_transfer.nccl_transport import NcclKVSender

        torch.cuda.set_device(P_GPU)
        uid = [int(b) & 0xFF for b in nccl.get_unique_id()]
        q_uid.put(uid)
        res: dict = {"raw": _raw(0, uid, cfg, barrier)}
        if cfg.get("raw_only"):
            res["nccl_info"] = _nccl_info(cfg, "prefill")
            q_res.put(("prefill", res))
            return
        shape = (LAYERS, 2, POOL_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
        pool = torch.randn(shape, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)
        tx = NcclKVSender(pool, KEY, nccl_tuning=cfg["tuning"], timing=True)
        uid = tx.unique_id()
        q_uid.put(uid)
        tx.connect("decode-0", uid, 0)
        res["nccl_info"] = _nccl_info(cfg, "prefill")
        n = cfg["warmup"] + cfg["repeats"]

        def transfer(compute=None) -> tuple[float, float, float, float, dict]:
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
            return t0, t_compute, h.announce_s, h.data_s, dict(h.trace or {})

        for variant in cfg["variants"]:
            res[variant] = [transfer() for _ in range(n)]
        if cfg.get("overlap"):
            x = torch.randn(TOKENS, 4096, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)
            w = torch.randn(4096, 14336, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)
            y = torch.empty(TOKENS, 14336, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)

            def layer() -> None:  # 4 x 2*2048*4096*14336 ~ 0.96 TFLOP ~ one 8B layer at 2k
                for _ in range(4):
                    torch.matmul(x, w, out=y)

            colocated = []
            for _ in range(n):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(LAYERS):
                    layer()
                torch.cuda.synchronize()
                colocated.append(time.perf_counter() - t0)
            res["colocated_s"] = colocated
            res["overlap"] = [transfer(layer) for _ in range(n)]
        tx.close()
        q_res.put(("prefill", res))
    except BaseException:
        q_res.put(("prefill", {"error": traceback.format_exc()}))


def _decode(cfg, q_uid, q_sink, q_res, barrier) -> None:
    try:
        _setup(cfg, "decode")
        from pdserve.kv_transfer import TransferStatus
        from pdserve.kv_transfer.nccl_transport import NcclKVReceiver

        torch.cuda.set_device(D_GPU)
        res: dict = {"raw": _raw(1, q_uid.get(timeout=120), cfg, barrier)}
        if cfg.get("raw_only"):
            res["nccl_info"] = _nccl_info(cfg, "decode")
            q_res.put(("decode", res))
            return
        pool = _layout().allocate(POOL_BLOCKS, f"cuda:{D_GPU}")
        rx = NcclKVReceiver(pool, KEY, name="decode-0", nccl_tuning=cfg["tuning"], timing=True)
        rx.connect("prefill-0", q_uid.get(timeout=120), 1)
        res["nccl_info"] = _nccl_info(cfg, "decode")
        n, count = cfg["warmup"] + cfg["repeats"], 0

        def transfer(variant: str, it: int) -> tuple[float, float | None, dict]:
            nonlocal count
            src, dst = _plan(variant, it)
            rid = f"r{count}"
            count += 1
            q_sink.put((rx.expect(rid, dst, TOKENS, time.time() + 60).to_dict(), src))
            state = rx.wait(rid, 30)
            t_done = time.time()
            if state is not TransferStatus.COMPLETE:
                raise RuntimeError(f"{rid}: {state} {rx.error(rid)}")
            data_s, trace = rx.data_seconds(rid), rx.trace(rid)
            rx.cancel(rid)
            return t_done, data_s, trace

        for variant in cfg["variants"]:
            res[variant] = [transfer(variant, i) for i in range(n)]
        if cfg.get("overlap"):
            res["overlap"] = [transfer("contiguous", i) for i in range(n)]
        rx.close()
        q_res.put(("decode", res))
    except BaseException:
        q_res.put(("decode", {"error": traceback.format_exc()}))


def _run_pair(cfg: dict, timeout: float) -> tuple[dict, dict]:
    """Both processes for one configuration; (prefill results, decode results)."""
    ctx = mp.get_context("spawn")
    q_uid, q_sink, q_res = ctx.Queue(), ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=f, args=(cfg, q_uid, q_sink, q_res, barrier))
             for f in (_prefill, _decode)]
    for proc in procs:
        proc.start()
    got: dict = {}
    failed = False
    try:
        deadline = time.monotonic() + timeout
        while len(got) < len(procs):
            role, res = q_res.get(timeout=max(1.0, deadline - time.monotonic()))
            got[role] = res
            if "error" in res:  # the other side would wait for it until its own timeout
                failed = True
                raise RuntimeError(f"{cfg['name']}: {role} failed:\n{res['error']}")
    except Exception as e:  # noqa: BLE001 - queue.Empty included: report and move on
        failed = True
        if not isinstance(e, RuntimeError):
            raise RuntimeError(f"{cfg['name']}: no result in {timeout} s (got {sorted(got)})") \
                from None
        raise
    finally:
        for proc in procs:
            proc.join(timeout=1 if failed else 30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return got["prefill"], got["decode"]


# ---- summaries ----------------------------------------------------------------------------------


def _gbs(nbytes: int, s: float | None) -> float | None:
    return None if not s else nbytes / s / 1e9


def _raw_summary(d: dict) -> dict:
    """Raw figures as the receiver timed them (the data has landed when its stream is done)."""
    kv = 256 * MIB
    out: dict = {"sizes": {}, "registered": d["raw"].get("registered")}
    for key, v in d["raw"].items():
        if isinstance(key, int):
            n = key * MIB
            out["sizes"][key] = {"bytes": n, "s": v[0], "GB/s": _gbs(n, v[0]),
                                 "gpu_s": v[1], "gpu_GB/s": _gbs(n, v[1])}
    for name in ("pattern", "pattern_fused"):
        host, gpu_s = d["raw"][name]
        out[name] = {"bytes": kv + TRAILER_BYTES, "s": host, "GB/s": _gbs(kv, host),
                     "gpu_s": gpu_s, "gpu_GB/s": _gbs(kv, gpu_s)}
    return out


def _transport_summary(cfg: dict, p: dict, d: dict, raw: dict) -> dict:
    kv = _layout().block_bytes * NBLK
    skip = cfg["warmup"]
    raw_one = raw["sizes"][256]["GB/s"]
    raw_pattern = raw["pattern"]["GB/s"]
    out = {}
    for variant in cfg["variants"]:
        pairs = list(zip(p[variant], d[variant]))[skip:]
        e2e = statistics.median(dt[0] - pt[0] for pt, dt in pairs)
        tx_s = [pt[3] for pt, _ in pairs if pt[3] is not None]
        rx_s = [dt[1] for _, dt in pairs if dt[1] is not None]
        data = [min(pt[3], dt[1]) for pt, dt in pairs if pt[3] is not None and dt[1] is not None]
        data_s = statistics.median(data) if data else None
        gbs, data_gbs = _gbs(kv, e2e), _gbs(kv, data_s)
        out[variant] = {
            "runs": len(block_runs(_plan(variant, 0)[1])),
            "s": e2e, "GB/s": gbs,
            "fraction_of_raw_256MiB": gbs / raw_one, "fraction_of_raw_pattern": gbs / raw_pattern,
            "data_s": data_s, "data_GB/s": data_gbs,
            "data_fraction_of_raw_256MiB": data_gbs / raw_one if data_gbs else None,
            "data_fraction_of_raw_pattern": data_gbs / raw_pattern if data_gbs else None,
            "data_s_prefill_stream": statistics.median(tx_s) if tx_s else None,
            "data_s_decode_stream": statistics.median(rx_s) if rx_s else None,
            "announce_s": statistics.median(pt[2] for pt, _ in pairs if pt[2] is not None),
            "timeline_ms": _timeline(pairs),
        }
    return out


TIMELINE = (("prefill", "written"), ("prefill", "first_launch"), ("decode", "announce"),
            ("decode", "posted"), ("prefill", "last_launch"), ("decode", "landed"),
            ("decode", "settled"), ("decode", "wait_returned"))


def _timeline(pairs: list) -> dict:
    """Median host-clock ms after `open` of each step (both processes share the clock)."""
    out = {}
    for side, step in TIMELINE:
        vals = []
        for pt, dt in pairs:
            t0 = pt[0]
            trace = {"wait_returned": dt[0], **(dt[2] or {})} if side == "decode" else pt[4]
            if trace and step in trace:
                vals.append((trace[step] - t0) * 1e3)
        if vals:
            out[f"{side}.{step}"] = round(statistics.median(vals), 3)
    return out


def _summarise(cfg: dict, p: dict, d: dict) -> dict:
    raw = _raw_summary(d)
    out = {"name": cfg["name"], "tuning": cfg["tuning"], "raw": raw,
           "kv_bytes": _layout().block_bytes * NBLK,
           "nccl_info": {"prefill": p.get("nccl_info"), "decode": d.get("nccl_info")}}
    if cfg.get("raw_only"):
        return out
    out["transport"] = _transport_summary(cfg, p, d, raw)
    if cfg.get("overlap"):
        skip = cfg["warmup"]
        colocated = statistics.median(p["colocated_s"][skip:])
        ttft = [dt[0] - pt[0] for pt, dt in zip(p["overlap"], d["overlap"])]
        compute = [pt[1] - pt[0] for pt in p["overlap"]][skip:]
        out["overlap"] = {"colocated_s": colocated,
                          "disaggregated_s": statistics.median(ttft[skip:]),
                          "compute_while_sending_s": statistics.median(compute),
                          "added_fraction": statistics.median(ttft[skip:]) / colocated - 1}
    return out


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _table(r: dict) -> str:
    raw = r["raw"]
    lines = ["| raw CuPy NCCL (receiver-timed) | size | time | GB/s | GPU time | GPU GB/s |",
             "|---|---|---|---|---|---|"]
    for mib, v in raw["sizes"].items():
        lines.append(f"| one message | {mib} MiB | {_ms(v['s'])} | {v['GB/s']:.1f} | "
                     f"{_ms(v['gpu_s'])} | {v['gpu_GB/s']:.1f} |")
    for name, what in (("pattern", "transport's calls: 64 x 4 MiB + trailer, a group a layer "
                        "sent, growing groups received"),
                       ("pattern_fused", "same calls, 1 group each side")):
        v = raw[name]
        lines.append(f"| {what} | 256 MiB | {_ms(v['s'])} | {v['GB/s']:.1f} | "
                     f"{_ms(v['gpu_s'])} | {v['gpu_GB/s']:.1f} |")
    if "transport" in r:
        lines += ["", "| ours, 2048-token 8B KV | open->COMPLETE | GB/s | of raw 256 MiB | "
                  "of raw pattern | data path | GB/s | of raw 256 MiB | of raw pattern | "
                  "announce |", "|---|---|---|---|---|---|---|---|---|---|"]
        for variant, v in r["transport"].items():
            data = "-" if v["data_GB/s"] is None else f"{v['data_GB/s']:.1f}"
            lines.append(
                f"| {variant} ({v['runs']} runs) | {_ms(v['s'])} | {v['GB/s']:.1f} | "
                f"{_pct(v['fraction_of_raw_256MiB'])} | {_pct(v['fraction_of_raw_pattern'])} | "
                f"{_ms(v['data_s'])} | {data} | {_pct(v['data_fraction_of_raw_256MiB'])} | "
                f"{_pct(v['data_fraction_of_raw_pattern'])} | {_ms(v['announce_s'])} |")
        lines += ["", "host timeline, median ms after `open` (prefill and decode share the clock):"]
        for variant, v in r["transport"].items():
            lines.append(f"  {variant}: " + ", ".join(f"{k} {x:.3f}"
                                                       for k, x in v["timeline_ms"].items()))
    if "overlap" in r:
        o = r["overlap"]
        lines += ["", "| layer-wise overlap (8B-sized matmuls, 32 layers) | time |", "|---|---|",
                  f"| compute alone (colocated TTFT proxy) | {o['colocated_s'] * 1e3:.2f} ms |",
                  f"| compute + send, until decode COMPLETE | "
                  f"{o['disaggregated_s'] * 1e3:.2f} ms |",
                  f"| compute alone while sending | {o['compute_while_sending_s'] * 1e3:.2f} ms |",
                  f"| added by disaggregation | {o['added_fraction']:+.1%} |"]
    return "\n".join(lines)


def _sweep_table(rows: list[dict]) -> str:
    lines = ["| tuning | raw 256 MiB GB/s | raw pattern GB/s | raw 1-group GB/s | ours open->"
             "COMPLETE | GB/s | of raw 256 (this tuning) | of raw pattern | data path GB/s | "
             "TTFT added by disaggregation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} {r['tuning']} | failed: {r['error'][-120:]!r} |"
                         " | | | | | | | |")
            continue
        raw, t = r["raw"], (r.get("transport") or {}).get("contiguous")
        name = f"{r['name']} {','.join(f'{k}={v}' for k, v in r['tuning'].items()) or '(none)'}"
        if raw.get("registered") is not None:
            name += f" registered: {raw['registered'] or 'ok'}"
        row = (f"| {name} | {raw['sizes'][256]['GB/s']:.1f} | {raw['pattern']['GB/s']:.1f} | "
               f"{raw['pattern_fused']['GB/s']:.1f} |")
        if t:
            data = "-" if t["data_GB/s"] is None else f"{t['data_GB/s']:.1f}"
            added = r["overlap"]["added_fraction"] if "overlap" in r else None
            row += (f" {_ms(t['s'])} | {t['GB/s']:.1f} | {_pct(t['fraction_of_raw_256MiB'])} | "
                    f"{_pct(t['fraction_of_raw_pattern'])} | {data} | "
                    f"{'-' if added is None else f'{added:+.1%}'} |")
        else:
            row += " n/a | | | | | |"
        lines.append(row)
    return "\n".join(lines)


def _parse_sweep(spec: str) -> list[tuple[str, str]]:
    if spec == "default":
        return list(SWEEP)
    out = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        name, _, tuning = item.partition(":")
        out.append((name.strip(), tuning.strip()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tuning", default="", help="NCCL tuning of the main run, e.g. "
                    "'P2P_NVL_CHUNKSIZE=131072' (kv_transfer/nccl_device.NCCL_TUNABLES)")
    ap.add_argument("--sweep", nargs="?", const="default", default=None,
                    help="also run each tuning of SWEEP (or 'name:K=V,...;name2:...') in fresh "
                    "processes; 'register' as a name runs raw with registered buffers")
    ap.add_argument("--sweep-repeats", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=150, help="seconds per process pair")
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 CUDA devices")
    from pdserve.kv_transfer.nccl_device import parse_nccl_tuning

    main_cfg = {"name": "main", "tuning": parse_nccl_tuning(args.tuning), "warmup": args.warmup,
                "repeats": args.repeats, "sizes": list(SIZES_MIB), "variants": list(VARIANTS),
                "overlap": True}
    sweep = _parse_sweep(args.sweep) if args.sweep else []
    for _, tuning in sweep:
        parse_nccl_tuning(tuning)  # refuse a bad sweep before the first run
    # An outer `timeout` sends SIGTERM: unwind, so _run_pair's `finally` kills the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def save(result: dict) -> None:  # after every step: a run cut short keeps what it had
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2, default=str)

    t_start = time.monotonic()
    p, d = _run_pair(main_cfg, args.timeout)
    result = _summarise(main_cfg, p, d)
    from cupy.cuda import nccl

    result["env"] = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                     "torch": torch.__version__, "nccl": nccl.get_version(),
                     "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(f"{result['env']}\nmain run, NCCL tuning {main_cfg['tuning'] or '(none)'} "
          f"({time.monotonic() - t_start:.0f} s)\n\n{_table(result)}\n", flush=True)
    print("NCCL INIT (prefill):", *result["nccl_info"]["prefill"] or [], sep="\n  ")
    save(result)
    if sweep:
        rows = [dict(result, name="main")]
        for name, tuning in sweep:
            cfg = {"name": name, "tuning": parse_nccl_tuning(tuning), "warmup": 1,
                   "repeats": args.sweep_repeats, "sizes": [256], "variants": ["contiguous"],
                   "overlap": name != "register", "register": name == "register",
                   "raw_only": name == "register"}
            t0 = time.monotonic()
            try:
                limit = 60 if cfg["raw_only"] else min(args.timeout, 90)
                rows.append(_summarise(cfg, *_run_pair(cfg, limit)))
            except Exception as e:  # noqa: BLE001 - one tuning failing must not lose the rest
                rows.append({"name": name, "tuning": cfg["tuning"], "error": str(e)})
            print(f"sweep {name} done in {time.monotonic() - t0:.0f} s", flush=True)
            result["sweep"] = [{k: v for k, v in r.items() if k not in ("env", "sweep")}
                               for r in rows]
            save(result)
        print(f"\n{_sweep_table(rows)}\n")
        for r in rows[1:]:
            if r.get("nccl_info"):
                print(f"NCCL INIT ({r['name']}, prefill):",
                      *r["nccl_info"]["prefill"] or [], sep="\n  ")
    save(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
