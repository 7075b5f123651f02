"""GPU measurements below the engine, for `pdserve.bench.micro.gpu_engine`: the machine's own
ceilings (device-to-device copy bandwidth, bf16 matmul rate), the attention kernels alone against
`F.scaled_dot_product_attention`, event timing, and a per-kernel profile summary.

Timings are medians of CUDA-event-timed repeats after warm-up, on random data (never zeros).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.messages import blocks_for


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of `fn()` between two CUDA events (host gaps included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn` captured in a CUDA graph (after one eager run), so short kernels are timed
    without Python launch overhead."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul 8192^3."""
    n, size = 2**29, 8192  # 1 GiB of bf16; the matmul of the targets
    copy_ms = _copy_ms(n)
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: torch.mm(a, b), iters=20)
    return {
        "copy_GBps": 2 * n * 2 / copy_ms / 1e6,
        "matmul_TFLOPs": 2 * size**3 / mm_ms / 1e9,
        "copy_ms": copy_ms,
        "matmul_ms": mm_ms,
    }


def _copy_ms(n: int) -> float:
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), iters=20)


def _paged(batch: int, ctx: int, kv_heads: int, head_dim: int, block: int, gen):
    num_blocks = batch * blocks_for(ctx, block)
    k = torch.randn(num_blocks, block, kv_heads, head_dim, device="cuda", generator=gen,
                    dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).int().view(batch, -1)
    return k, v, tables


def _meta(query_lens: list[int], seq_lens: list[int], tables: torch.Tensor):
    from pdserve.engine.attention.metadata import AttentionMetadata

    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables,
        slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64, device="cuda"),
        query_lens_host=query_lens, seq_lens_host=seq_lens,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
    )


def decode_attention(batch: int = 32, ctx: int = 4096, heads: int = 32, kv_heads: int = 8,
                     head_dim: int = 128, block: int = 16) -> dict:
    """Our split-K decode kernel (graph-replayed) vs SDPA over contiguous GQA K/V."""
    from pdserve.engine.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator(device="cuda").manual_seed(0)
    k, v, tables = _paged(batch, ctx, kv_heads, head_dim, block, gen)
    q = torch.randn(batch, heads, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    meta = _meta([1] * batch, [ctx] * batch, tables)
    backend, scale = TritonAttentionBackend(), head_dim**-0.5
    ours_ms = time_ms(graphed(lambda: backend.forward(q, k, v, meta, scale)), iters=50)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * 2
    out = {"batch": batch, "context": ctx, "kv_MB": kv_bytes / 1e6, "triton_ms": ours_ms,
           "triton_GBps": kv_bytes / ours_ms / 1e6}
    try:  # SDPA needs contiguous per-sequence K/V: gather once, outside the timing
        kc = k[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
        vc = v[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
        qs = q.unsqueeze(2)
        sdpa = graphed(lambda: F.scaled_dot_product_attention(qs, kc, vc, scale=scale,
                                                              enable_gqa=True))
        out["sdpa_ms"] = time_ms(sdpa, iters=50)
        out["sdpa_GBps"] = kv_bytes / out["sdpa_ms"] / 1e6
    except Exception as e:  # a missing SDPA path is reported, not fatal
        out["sdpa_error"] = repr(e)[:200]
    return out


def prefill_attention(tokens: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                      block: int = 16) -> dict:
    """Our varlen causal prefill kernel vs SDPA (flash) on one sequence of `tokens`."""
    from pdserve.engine.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator(device="cuda").manual_seed(1)
    k, v, tables = _paged(1, tokens, kv_heads, head_dim, block, gen)
    q = torch.randn(tokens, heads, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    meta = _meta([tokens], [tokens], tables)
    backend, scale = TritonAttentionBackend(), head_dim**-0.5
    flops = 4 * heads * head_dim * tokens * (tokens + 1) / 2  # causal QK^T and PV
    ours_ms = time_ms(lambda: backend.forward(q, k, v, meta, scale), iters=10)
    group = heads // kv_heads
    kc = k[tables[0].long()].flatten(0, 1)[:tokens].repeat_interleave(group, 1)
    vc = v[tables[0].long()].flatten(0, 1)[:tokens].repeat_interleave(group, 1)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, kc, vc))
    sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                             scale=scale), iters=10)
    return {"tokens": tokens, "triton_ms": ours_ms, "triton_TFLOPs": flops / ours_ms / 1e9,
            "sdpa_ms": sdpa_ms, "sdpa_TFLOPs": flops / sdpa_ms / 1e9}


def _category(name: str) -> str:
    low = name.lower()
    if any(s in low for s in ("_decode_split", "_decode_reduce", "_prefill_kernel", "flash",
                              "fmha")):
        return "attention"
    if "_write_kv" in low:
        return "write_kv"
    if any(s in low for s in ("_rms_norm", "_rope", "_silu_mul")):
        return "fused glue (norm/rope/silu)"
    if any(s in low for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "cublas")):
        return "matmul (cuBLAS)"
    return "other (torch elementwise, sampling, copies)"


def kernel_profile(fn: Callable[[], object], steps: int = 5) -> dict:
    """GPU time per step by kernel and by category, from the torch profiler (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        # Eager torch ops ("aten::mm") also report their kernels' time as their own (seen on
        # torch 2.11); counting them would count those kernels twice.
        if us > 0 and not e.key.startswith("aten::"):
            kernels.append({"kernel": e.key[:90], "calls_per_step": e.count / steps,
                            "us_per_step": us / steps})
    kernels.sort(key=lambda r: -r["us_per_step"])
    cats: dict[str, float] = {}
    for r in kernels:
        c = _category(r["kernel"])
        cats[c] = cats.get(c, 0.0) + r["us_per_step"]
    return {"kernel_us_per_step": sum(r["us_per_step"] for r in kernels),
            "kernel_launches_per_step": sum(r["calls_per_step"] for r in kernels),
            "by_category_us": cats, "top_kernels": kernels[:15]}


# ---- Triton GEMV vs cuBLAS at Llama-3.1-8B projection shapes ------------------------------

GEMV_SHAPES = {  # name: (in_features, out_features)
    "qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672),
    "down": (14336, 4096), "lm_head": (4096, 128256),
}


def gemv_configs(rows: int) -> list:
    """The block-size sweep: the sum kernel (one row only) and the tensor-core dot kernel."""
    from pdserve.engine.layers.gemv import GemvConfig

    dot = [GemvConfig("dot", bn, bk, w, s) for bn, bk, w, s in
           ((16, 256, 4, 4), (16, 128, 4, 6), (16, 512, 4, 3), (32, 256, 4, 4),
            (32, 128, 4, 5), (16, 256, 8, 4))]
    if rows != 1:
        return dot
    return [GemvConfig("sum", bn, bk, w, 1) for bn, bk, w in
            ((16, 512, 4), (8, 512, 4), (8, 1024, 4), (16, 1024, 8), (16, 256, 4),
             (32, 256, 4), (32, 512, 8), (4, 1024, 4))] + dot


def _per_weight(fn, ws: list, nbytes: int, ceil: dict) -> dict:
    """`fn(w)` for every weight in `ws`, graphed: microseconds and GB/s per product."""
    ms = time_ms(graphed(lambda: [fn(w) for w in ws]), warmup=3, iters=20) / len(ws)
    gbps = nbytes / ms / 1e6
    return {"us": ms * 1e3, "GBps": gbps, "frac_copy_bw": gbps / ceil["copy_GBps"]}


def gemv_shapes(ceil: dict, rows_list=(1, 8), shapes=None, l2_bytes: int = 256 << 20) -> list:
    """Each projection shape alone: cuBLAS (`F.linear`) against the Triton GEMV for every
    config of the sweep. One CUDA graph runs the product on enough distinct weight copies
    to exceed `l2_bytes` (as a model's layers do: nothing is served from L2); time per
    product = replay / copies. GB/s counts the weight, x and the output once."""
    from pdserve.engine.layers.gemv import gemv, get_config

    rows_out = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (k, n) in (shapes or GEMV_SHAPES).items():
        wbytes = n * k * 2
        copies = max(1, -(-l2_bytes // wbytes))
        ws = [(torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
              for _ in range(copies)]
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            nbytes = wbytes + (m * k + m * n) * 2

            row = {"shape": name, "in": k, "out": n, "rows": m, "weight_MB": wbytes / 1e6,
                   "copies": copies, "triton": [],
                   "cublas": _per_weight(lambda w, x=x: F.linear(x, w), ws, nbytes, ceil)}
            default = get_config(n, k, m)
            ref = F.linear(x.float(), ws[0].float())
            for cfg in gemv_configs(m):
                entry = {"config": dataclasses.asdict(cfg), "programs": cfg.programs(n),
                         "default": cfg == default}
                try:
                    err = (gemv(x, ws[0], None, cfg).float() - ref).abs().max().item()
                    entry.update(_per_weight(lambda w, x=x, cfg=cfg: gemv(x, w, None, cfg), ws,
                                             nbytes, ceil), max_err=err)
                except Exception as e:  # e.g. out of shared memory: report, keep sweeping
                    entry["error"] = repr(e)[:200]
                row["triton"].append(entry)
            ok = [t for t in row["triton"] if "us" in t and t["max_err"] < 0.1]
            row["best"] = min(ok, key=lambda t: t["us"]) if ok else None
            rows_out.append(row)
            best = row["best"]
            print(f"gemv {name} rows {m}: cuBLAS {row['cublas']['us']:.1f} us "
                  f"({row['cublas']['frac_copy_bw']:.1%}), best Triton "
                  + (f"{best['us']:.1f} us ({best['frac_copy_bw']:.1%}) {best['config']}"
                     if best else "none"), flush=True)
        del ws
        torch.cuda.empty_cache()
    return rows_out
