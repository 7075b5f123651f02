"""Triton GEMV for a few rows: `x @ W.T (+ bias)`, W in the engine's `[out, in]` row-major
layout, for decode steps of 1..8 tokens.

Why: at batch 1 a projection only streams its weight once, so it should run at copy
bandwidth. On an H100, cuBLAS reaches 95 % of it for gate|up and down, but only 81-82 % for
q|k|v (4096 -> 6144) and o_proj (4096 -> 4096), where it also picks split-K kernels whose
reduce kernels cost ~120 us a step (64 launches).

Design: no split-K. Each program owns a BLOCK_N slab of output features and loops over all
of K, so the whole product is one launch, and W is read once, in [BLOCK_N, BLOCK_K] tiles
contiguous along K (wide, coalesced vector loads). Two kernels:

- `_gemv_sum_kernel` (one row): fp32 accumulator of the tile's shape, `acc += w * x`, one
  reduction over K after the loop (no shuffles inside the loop);
- `_gemv_dot_kernel` (1..16 rows): x padded to 16 rows, `tl.dot` on the tensor cores (the
  waste does not matter, the step is memory-bound); its loads are software-pipelined over
  `num_stages` iterations, so more bytes are in flight.

Out-of-range rows of W and of x are clamped to the last valid one instead of masked, so
loads stay unmasked vector loads; only a ragged K needs a mask. Grids depend on shapes
only (no host sync), so launches can be captured in CUDA graphs. Accumulation is fp32; the
result is rounded once to the activation dtype (bias added in fp32 before that).

Block sizes: `GemvConfig`; defaults below, per-shape overrides through `set_config` (the
bench's `gemv_ab` section sweeps them on the GPU).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the dot kernel pads rows to this; dense() uses it for <= 8 rows


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    kernel: str = "sum"  # "sum" (one row only) or "dot"
    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3

    def programs(self, n: int) -> int:
        return triton.cdiv(n, self.block_n)


# One row: 16 x 512 bf16 = 16 KB of W per program per iteration; N = 4096 -> 256 programs,
# 6144 -> 384 (about 2-3 per SM on 132 SMs). Several rows: x padded to 16, tensor cores.
DEFAULT_ONE_ROW = GemvConfig("sum", 16, 512, 4, 1)
DEFAULT_FEW_ROWS = GemvConfig("dot", 16, 256, 4, 4)

_overrides: dict[tuple[int, int, bool], GemvConfig] = {}


def set_config(n: int, k: int, one_row: bool, config: GemvConfig | None) -> None:
    """Use `config` for weights of shape [n, k] (for one row or for 2..16 rows); None
    restores the default."""
    if config is not None and config.kernel == "sum" and not one_row:
        raise ValueError("the sum kernel computes one row only")
    if config is None:
        _overrides.pop((n, k, one_row), None)
    else:
        _overrides[(n, k, one_row)] = config


def get_config(n: int, k: int, rows: int) -> GemvConfig:
    one = rows == 1
    return _overrides.get((n, k, one), DEFAULT_ONE_ROW if one else DEFAULT_FEW_ROWS)


@triton.jit
def _gemv_sum_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: loads need no mask on N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_w + offs_k[None, :]
    x_ptrs = x_ptr + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    xrows = tl.minimum(offs_m, M - 1).to(tl.int64)  # padding rows repeat the last row
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + xrows[:, None] * stride_x + offs_k[None, :]
    # W^T as a [BLOCK_K, BLOCK_N] tile (still contiguous along K, so loads stay coalesced).
    w_ptrs = w_ptr + rows[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # interpreter only: its dot multiplies bf16's raw bits
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_INTERPRETED = type(_gemv_sum_kernel).__name__ == "InterpretedFunction"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x of 1..16 rows (any leading dims), weight
    `[N, K]` contiguous and of x's dtype. No host sync: capturable in CUDA graphs."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows, got {m}")
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    cfg = config or get_config(n, k, m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else weight  # a placeholder pointer, never read
    grid = (cfg.programs(n),)
    even_k = k % cfg.block_k == 0
    if cfg.kernel == "sum":
        if m != 1:
            raise ValueError("the sum kernel computes one row only")
        _gemv_sum_kernel[grid](
            x2, weight, b, out, n, k, weight.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=even_k,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif cfg.kernel == "dot":
        _gemv_dot_kernel[grid](
            x2, weight, b, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=even_k, IEEE=x.dtype == torch.float32,
            UPCAST=_INTERPRETED and x.dtype == torch.bfloat16,
            BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        raise ValueError(f"unknown gemv kernel {cfg.kernel!r}")
    return out.view(*lead, n)
