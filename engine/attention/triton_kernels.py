"""Triton kernels for paged attention over `[num_blocks, block_size, kv_heads, head_dim]` caches.

Three jobs, each a `@triton.jit` kernel behind a thin launcher that takes its grid from host
fields (no device sync, so the launchers can be captured in a CUDA graph):

- `write_kv`: scatter the step's new K/V rows into their cache slots (slot -1 = padding);
- `decode_attention`: one query token per sequence, flash-decoding style. The context is cut
  into splits so that a small batch still fills the GPU; each program owns one
  (sequence, kv head, split), attends all query heads of that GQA group at once (K/V are read
  once per group, not once per query head), and leaves a partial output plus its log-sum-exp;
  a reduce kernel merges the splits;
- `prefill_attention`: a chunk of new queries over its cached prefix plus itself (varlen,
  causal with offset: query row j of sequence i sits at position
  `seq_len_i - query_len_i + j` and sees keys at positions <= that).

Kernels look every key up through the block table token by token, so tile sizes are free of
the cache's block size. Softmax runs in fp32, in base 2 (`exp2` with the scale folded in).
Caches must have a unit last stride; K and V caches must share strides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True, slots=True)
class AttentionTiles:
    """Tile sizes and launch knobs, one place to tune them. Defaults were the best of a few
    tried on an H200 (bf16, head_dim 128, block 16). `block_*` are powers of two >= 16 (the
    smallest `tl.dot` operand)."""

    prefill_block_m: int = 64  # query rows per program
    prefill_block_n: int = 64  # keys per inner-loop step
    prefill_num_warps: int = 4
    prefill_num_stages: int = 2
    decode_block_n: int = 64  # keys per inner-loop step
    decode_num_warps: int = 4
    decode_num_stages: int = 3
    decode_min_split: int = 256  # fewest keys worth a split of their own
    decode_max_splits: int = 64  # bounds the reduce kernel's registers
    # Programs to aim for in decode (None: 2 per SM on CUDA, 1 under the interpreter).
    decode_target_programs: int | None = None
    # Force the keys per split (rounded up to decode_block_n); tests use it to exercise reduce.
    decode_split_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("prefill_block_m", "prefill_block_n", "decode_block_n"):
            size = getattr(self, name)
            assert _is_pow2(size) and size >= 16, f"{name}={size} must be a power of two >= 16"
        assert self.decode_max_splits >= 1 and self.decode_min_split >= 1


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per new token: copy its `[kv_heads, head_dim]` K and V rows to its slot."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # A padding slot empties the head range (scalar & block masks trip the interpreter).
    mask = (h < tl.where(slot >= 0, num_kv_heads, 0))[:, None] & (d < HEAD_DIM)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    dst = dst + h[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_offsets(block_table_row, pos, valid, kv_head, stride_cb, stride_cs, stride_ch,
                BLOCK_SIZE: tl.constexpr):
    """Cache offsets (int64: pools exceed 2**31 elements) of the keys at positions `pos`."""
    block = tl.load(block_table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """`a @ b` accumulated in fp32. UPCAST is set only under the interpreter, whose dot
    multiplies bf16's raw bits; the operands are already rounded to their dtype, so the
    result still matches the GPU's bf16 tensor-core product."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr):
    """Fold one tile of base-2 scores `s` [M, N] and values `v` [N, D] into the running state.

    Every row must have seen one unmasked key by its first tile, so `m_i` is finite after it
    and `alpha` never becomes exp2(-inf - -inf).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale_log2, split_size, num_splits, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (num_seqs, kv_heads, num_splits): keys [split*split_size, +split_size) of one
    sequence for the GROUP query heads sharing one kv head. Sequences whose query_len is not
    1 belong to the prefill kernel and do nothing here (that is what lets mixed batches run
    both kernels over the same metadata without building index lists on the host).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(query_start_ptr + seq)
    is_decode = tl.load(query_start_ptr + seq + 1) - row == 1
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = split * split_size
    hi = tl.where(is_decode, tl.minimum(lo + split_size, seq_len), lo)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        offs = _kv_offsets(bt_row, pos, valid, kv_head, stride_cb, stride_cs, stride_ch,
                           BLOCK_SIZE)
        kv_mask = valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q.to(k.dtype), tl.trans(k), UPCAST) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)

    # Empty splits (past seq_len, or a prefill sequence) store nothing; the guard only keeps
    # their never-stored lanes free of 0/0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    heads_used = tl.where(lo < hi, GROUP, 0)
    store_mask = (g < heads_used)[:, None] & d_valid[None, :]
    if SINGLE_SPLIT:
        out = acc / l_safe[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None],
                 mask=store_mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=g < heads_used)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, query_start_ptr,
    split_size, num_splits, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (num_seqs, num_heads): merge the non-empty splits of one head by their weights
    exp2(lse_s - max lse); only decode sequences are written.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_ptr + seq)
    is_decode = tl.load(query_start_ptr + seq + 1) - row == 1
    seq_len = tl.load(seq_lens_ptr + seq)
    n_used = tl.where(is_decode, (seq_len + split_size - 1) // split_size, 0)

    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_valid = s < n_used
    part = (seq * num_heads + head) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=s_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    w = tl.where(s_valid, tl.exp2(lse - tl.where(n_used > 0, lse_max, 0.0)), 0.0)
    mask = s_valid[:, None] & (d < HEAD_DIM)[None, :]
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    # The split holding the max has weight 1, so the sum is >= 1 whenever anything is stored.
    out = tl.sum(w[:, None] * parts, 0) / tl.maximum(tl.sum(w, 0), 1.0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < tl.where(n_used > 0, HEAD_DIM, 0))


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SKIP_DECODE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (cdiv(max_query_len, BLOCK_M), num_seqs, num_heads): BLOCK_M query rows of one
    sequence and head. Tiles past a sequence's query_len do nothing, and so do decode
    sequences when SKIP_DECODE (the decode kernel owns them).
    """
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len + m_block * BLOCK_M  # position of this tile's first query row
    active = m_block * BLOCK_M < q_len
    if SKIP_DECODE:
        active = active & (q_len != 1)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = first_pos + tl.arange(0, BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    # Whole tiles of keys below first_pos are visible to every row: no mask, no bounds check.
    # The rest (up to the last row's position) needs the causal mask. Both loops start at a
    # tile holding key 0, which every row sees, as _softmax_step requires.
    full_hi = tl.where(active, first_pos // BLOCK_N * BLOCK_N, 0)
    hi = tl.where(active, tl.minimum(seq_len, first_pos + BLOCK_M), 0)
    for start in range(0, full_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        offs = _kv_offsets(bt_row, pos, pos < full_hi, kv_head, stride_cb, stride_cs, stride_ch,
                           BLOCK_SIZE)
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=d_valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=d_valid[None, :], other=0.0)
        s = _dot(q.to(k.dtype), tl.trans(k), UPCAST) * scale_log2
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)
    for start in range(full_hi, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        offs = _kv_offsets(bt_row, pos, valid, kv_head, stride_cb, stride_cs, stride_ch,
                           BLOCK_SIZE)
        kv_mask = valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q.to(k.dtype), tl.trans(k), UPCAST) * scale_log2
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty),
             mask=(rows < tl.where(active, q_len, 0))[:, None] & d_valid[None, :])


# Launchers. `triton.jit` reads TRITON_INTERPRET when this module is imported, not at launch.
_INTERPRETED = type(_write_kv_kernel).__name__ == "InterpretedFunction"


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            "Triton attention needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "pdserve.engine.attention.triton_kernels is imported; use the 'torch' backend on CPU"
        )
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches: [blocks, bs, kvh, d]"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, (
        "K and V caches must share strides and have a unit last stride"
    )
    assert _is_pow2(k_cache.shape[1]), f"block_size {k_cache.shape[1]} must be a power of two"


def _upcast_dot(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and _INTERPRETED


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store `k[t]`, `v[t]` (`[T, kv_heads, head_dim]`) at flat slot `slot_mapping[t]`
    (int64, block * block_size + offset); rows whose slot is -1 are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_cache(k_cache, v_cache)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                       tiles: AttentionTiles, device: torch.device) -> tuple[int, int]:
    """(split_size, num_splits) for a decode launch, from host-side sizes only.

    Split-K exists because decode has one query per sequence: with small batches,
    num_seqs * kv_heads programs leave most SMs idle while each walks a long context. We
    split just enough to reach the target program count, never into splits shorter than
    `decode_min_split` keys (the reduce pass would then cost more than it saves).
    Depends only on (num_seqs, kv_heads, max_seq_len), so a CUDA graph captured with
    max_seq_len = the model's max length stays valid for every shorter context.
    """
    block_n = tiles.decode_block_n
    max_seq_len = max(max_seq_len, 1)
    if tiles.decode_split_size is not None:
        split = triton.cdiv(tiles.decode_split_size, block_n) * block_n
    else:
        target = tiles.decode_target_programs
        if target is None:
            target = 2 * _sm_count(device.index or 0) if device.type == "cuda" else 1
        wanted = triton.cdiv(target, num_seqs * num_kv_heads)
        worth = triton.cdiv(max_seq_len, tiles.decode_min_split)
        split = triton.cdiv(triton.cdiv(max_seq_len, max(1, min(wanted, worth))), block_n)
        split *= block_n
    if triton.cdiv(max_seq_len, split) > tiles.decode_max_splits:
        split = triton.cdiv(triton.cdiv(max_seq_len, tiles.decode_max_splits), block_n) * block_n
    return split, triton.cdiv(max_seq_len, split)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, num_seqs: int, max_seq_len: int,
                     tiles: AttentionTiles) -> None:
    """Write `out` rows of the sequences whose query_len is 1 (others are left untouched)."""
    _check_cache(k_cache, v_cache)
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    split_size, num_splits = plan_decode_splits(num_seqs, num_kv_heads, max_seq_len, tiles,
                                                q.device)
    single = num_splits == 1
    if single:  # written straight to `out`; the partial buffers are never touched
        part_out = part_lse = out
    else:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim),
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32,
                               device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse,
        block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, split_size, num_splits, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=_block_d(head_dim),
        BLOCK_N=tiles.decode_block_n, SINGLE_SPLIT=single,
        UPCAST=_upcast_dot(q),
        num_warps=tiles.decode_num_warps, num_stages=tiles.decode_num_stages,
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, seq_lens, query_start_loc,
            split_size, num_splits, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, num_seqs: int,
                      max_query_len: int, tiles: AttentionTiles, skip_decode: bool) -> None:
    """Write `out` rows of every sequence (of those with query_len > 1 if `skip_decode`)."""
    _check_cache(k_cache, v_cache)
    _, num_heads, head_dim = q.shape
    block_m = tiles.prefill_block_m
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=tiles.prefill_block_n, BLOCK_D=_block_d(head_dim),
        SKIP_DECODE=skip_decode, UPCAST=_upcast_dot(q),
        num_warps=tiles.prefill_num_warps, num_stages=tiles.prefill_num_stages,
    )

