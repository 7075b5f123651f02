"""Fused Triton kernels for the per-token glue between the matmuls: RMSNorm (optionally
fused with the residual add before it), rotary embedding of q and k in place, and SiLU-mul.
`rope_write_kv_` also stores the rotated k and v in the paged KV cache, so RoPE and the
cache write are one kernel a layer instead of two.

Why: in a decode step each of these is a handful of separate torch kernels over a few KB
(RMSNorm alone is ~7: cast, square, mean, rsqrt, multiply, cast, scale), and at batch 1 a
kernel costs a few microseconds whatever its size, so ~35 small kernels a layer cost more
than the layer's attention. One kernel each cuts that to ~5; in prefill they also save
passes over the activations.

Numerics follow the torch reference (`engine.layers.norm_rope`, `F.silu(g) * u`) step by
step, including where it rounds to the activation dtype, so fused and unfused models agree
to the last bit in most elements. The launchers take their grids from shapes only (no
device sync), so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row: [res_out = x + res;] out = w * cast(norm_fp32(x))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the activation dtype, as `x + h` in torch is, before it is normalised.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=0) / n_cols
    y = (x32 * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_halves(x1, x2, c1, c2, s1, s2):
    """rotate_half in fp32: [x1, x2] * cos + [-x2, x1] * sin, rounded to the input dtype.
    The one copy of the RoPE arithmetic, so every kernel using it rounds alike."""
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    y1 = (a * c1[None, :] - b * s1[None, :]).to(x1.dtype)
    y2 = (b * c2[None, :] + a * s2[None, :]).to(x2.dtype)
    return y1, y2


@triton.jit
def _rope_rows(ptr, stride_t, stride_h, t, num_heads, c1, c2, s1, s2, d, d_mask,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    mask = (h < num_heads)[:, None] & d_mask[None, :]
    base = ptr + t * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    y1, y2 = _rotate_halves(x1, x2, c1, c2, s1, s2)
    tl.store(base, y1, mask=mask)
    tl.store(base + HALF, y2, mask=mask)


@triton.jit
def _rope_table_rows(cos_ptr, sin_ptr, pos_ptr, t, stride_c, d, d_mask, HALF: tl.constexpr):
    """The cos/sin halves of token `t`'s position (fp32 tables `[max_pos, 2 * HALF]`)."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    row = pos * stride_c
    c1 = tl.load(cos_ptr + row + d, mask=d_mask, other=0.0)
    c2 = tl.load(cos_ptr + row + HALF + d, mask=d_mask, other=0.0)
    s1 = tl.load(sin_ptr + row + d, mask=d_mask, other=0.0)
    s2 = tl.load(sin_ptr + row + HALF + d, mask=d_mask, other=0.0)
    return c1, c2, s1, s2


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    """One program per token: rotate all its q and k heads in place."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    c1, c2, s1, s2 = _rope_table_rows(cos_ptr, sin_ptr, pos_ptr, t, stride_c, d, d_mask, HALF)
    _rope_rows(q_ptr, stride_qt, stride_qh, t, num_heads, c1, c2, s1, s2, d, d_mask,
               HALF, BLOCK_HQ)
    _rope_rows(k_ptr, stride_kt, stride_kh, t, num_kv_heads, c1, c2, s1, s2, d, d_mask,
               HALF, BLOCK_HK)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
    stride_cb, stride_cs, stride_ch,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One program per token: rotate its q heads in place, and store its rotated k heads
    and its v heads at its cache slot (none for slot < 0). `k` itself is not written.

    The same arithmetic as `_rope_kernel` followed by `_write_kv_kernel`: k is rotated in
    fp32, rounded to k's dtype, then cast to the cache's dtype.
    """
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    c1, c2, s1, s2 = _rope_table_rows(cos_ptr, sin_ptr, pos_ptr, t, stride_c, d, d_mask, HALF)
    _rope_rows(q_ptr, stride_qt, stride_qh, t, num_heads, c1, c2, s1, s2, d, d_mask,
               HALF, BLOCK_HQ)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_HK)
    # A padding slot empties the head range (scalar & block masks trip the interpreter).
    mask = (h < tl.where(slot >= 0, num_kv_heads, 0))[:, None] & d_mask[None, :]
    src_k = k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    dst = dst + h[:, None] * stride_ch + d[None, :]
    x1 = tl.load(src_k, mask=mask, other=0.0)
    x2 = tl.load(src_k + HALF, mask=mask, other=0.0)
    y1, y2 = _rotate_halves(x1, x2, c1, c2, s1, s2)
    k_ty = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + dst, y1.to(k_ty), mask=mask)
    tl.store(k_cache_ptr + dst + HALF, y2.to(k_ty), mask=mask)
    v_ty = v_cache_ptr.dtype.element_ty
    v1 = tl.load(src_v, mask=mask, other=0.0)
    v2 = tl.load(src_v + HALF, mask=mask, other=0.0)
    tl.store(v_cache_ptr + dst, v1.to(v_ty), mask=mask)
    tl.store(v_cache_ptr + dst + HALF, v2.to(v_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    """Grid (rows, col blocks): out = cast(silu(gate)) * up, for x = [gate | up]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g32 = g.to(tl.float32)
    # F.silu rounds to the activation dtype before the product, so do we.
    s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    out = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of a 2-D `x`, HF numerics (fp32 norm, cast, then scale)."""
    assert x.dim() == 2 and x.stride(-1) == 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block = triton.next_power_of_2(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](
        x, x, weight, out, out, x.stride(0), 0, out.stride(0), 0, x.shape[1], eps,
        HAS_RESIDUAL=False, BLOCK=block, num_warps=_norm_warps(block),
    )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual` and `rms_norm(s)` in one pass; returns (s, normed)."""
    assert x.shape == residual.shape and x.dim() == 2
    assert x.stride(-1) == 1 and residual.stride(-1) == 1
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    if x.shape[0] == 0:
        return total, out
    block = triton.next_power_of_2(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, out, total, x.stride(0), residual.stride(0), out.stride(0),
        total.stride(0), x.shape[1], eps,
        HAS_RESIDUAL=True, BLOCK=block, num_warps=_norm_warps(block),
    )
    return total, out


def rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> None:
    """Rotate `q` `[T, H, D]` and `k` `[T, Hkv, D]` in place by the rows `positions` of the
    `[max_pos, D]` cos/sin tables (HF rotate_half layout: both halves share a frequency)."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
    assert cos.stride() == sin.stride()
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q, k, cos, sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        num_heads, k.shape[1],
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        num_warps=4,
    )


def rope_write_kv_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """`rope_(positions, q, k, cos, sin)` then `write_kv(k, v, k_cache, v_cache,
    slot_mapping)` in one kernel: `q` `[T, H, D]` is rotated in place; `k`, `v`
    `[T, Hkv, D]` go, k rotated, to the flat slots `slot_mapping[t]` (int64, -1 = skip) of
    the `[num_blocks, block_size, Hkv, D]` caches. `k` is left as it was (not rotated).
    Bit-identical results to the two separate kernels."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cos.stride(-1) == 1 and cos.stride() == sin.stride()
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.stride(-1) == 1
    block_size = k_cache.shape[1]
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    half = head_dim // 2
    _rope_write_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, positions, slot_mapping, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_heads, num_kv_heads,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=block_size, num_warps=4,
    )


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `x = [gate | up]` along the last dim of a 2-D tensor."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](
        x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4,
    )
    return out
