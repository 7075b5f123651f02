"""Reference paged attention in plain torch: correct everywhere, fast enough on CPU.

Prefill chunks are attended one sequence at a time (their causal masks differ): by our CPU
kernel on an AVX-512 host (`engine.layers.cpu_kernels.prefill_attention`), else gathered
for bmm + softmax or SDPA. All decode tokens of a step are attended together: by our CPU
kernel, which reads K/V in place from the blocks
(`engine.layers.cpu_kernels.paged_decode_attention`), or, where it cannot run, gathered
into one padded batch for a single SDPA call.

What depends only on the batch's shape (which rows decode, block ids, masks) is planned
once per step (`_StepPlan`, through `forward_context.step_cached`) and reused by every
layer; per layer there remain the K/V gathers and the attention calls (one for the decode
batch, one per prefill chunk). On a small model that per-layer host-side work is a large
share of a CPU decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine import forward_context
from pdserve.engine.attention.backend import AttentionBackend, register_backend
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.layers import cpu_kernels
from pdserve.messages import blocks_for


def gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens cached in blocks `block_ids` (in order), as
    `[length, kv_heads, head_dim]`. `block_ids` may be a whole block-table row: entries past
    the blocks that hold `length` tokens (e.g. -1 padding) are never read.

    `index_select` on the block axis copies whole blocks (memcpy of contiguous rows); it
    is several times faster on CPU than advanced indexing `cache[ids]`, which goes through
    the generic index kernel, and gives the same tensor.
    """
    n_blocks = blocks_for(length, cache.shape[1])
    return cache.index_select(0, block_ids[:n_blocks].long()).flatten(0, 1)[:length]


# Prefill chunks whose score matrix (heads x query_len x seq_len) has at most this many
# entries are attended with two batched matmuls and a softmax (`_prefill_matmul`: fewer
# calls, level or ahead for chunks of up to ~100 tokens); larger ones go through SDPA with
# each kv head repeated for its query heads, in 4-D, so that CPU SDPA takes its flash kernel
# (blocked, never materialising the scores, skipping the blocks above the diagonal when
# causal). With `enable_gqa`, or 3-D inputs, it takes its math path instead, 2-3x slower
# than the matmul form (docs/benchmarks.md, "Prefill attention on CPU").
_MATMUL_PREFILL_MAX_SCORES = 1 << 20


@dataclass(slots=True)
class _PrefillPlan:
    start: int  # first row of the sequence in the flattened batch
    query_len: int
    seq_len: int
    block_ids: torch.Tensor  # int64, the blocks holding tokens [0, seq_len)
    mask: torch.Tensor | None  # [query_len, seq_len] bool; None: plain causal (no context)
    bias: torch.Tensor | None = None  # [query_len, seq_len] 0 / -inf, made on first use
    table: torch.Tensor | None = None  # block_ids as int32, made on first use


@dataclass(slots=True)
class _DecodePlan:
    # Rows of q that decode: None, every row of the batch in order; a slice when they are
    # consecutive (the scheduler puts running sequences first: views, not index copies).
    rows: torch.Tensor | slice | None
    block_ids: torch.Tensor  # [num_seqs * blocks_per_seq] int64, -1 padding clamped to 0
    max_len: int
    mask: torch.Tensor | None  # [num_seqs, 1, 1, max_len] bool; None when lengths are equal
    tables: torch.Tensor  # [num_seqs, blocks of the longest] int32, the decode rows' tables
    lens: torch.Tensor  # [num_seqs] int32


@dataclass(slots=True)
class _StepPlan:
    prefills: list[_PrefillPlan]
    decode: _DecodePlan | None


def _plan(meta: AttentionMetadata, block_size: int) -> _StepPlan:
    device = meta.block_tables.device
    prefills: list[_PrefillPlan] = []
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    start = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if qlen == 1:
            decode_rows.append(start)
            decode_seqs.append(i)
        elif qlen > 0:
            n_blocks = blocks_for(slen, block_size)
            mask = None
            if qlen != slen:
                # Query j sits at position slen - qlen + j and sees keys up to that position.
                qpos = torch.arange(slen - qlen, slen, device=device)[:, None]
                mask = torch.arange(slen, device=device)[None, :] <= qpos
            prefills.append(_PrefillPlan(
                start, qlen, slen, meta.block_tables[i, :n_blocks].long(), mask
            ))
        start += qlen
    decode = None
    if decode_seqs:
        whole = len(decode_rows) == start  # every row decodes: rows == seqs == 0..B-1
        decode = _plan_decode(meta, None if whole else decode_rows, decode_seqs, block_size)
    return _StepPlan(prefills, decode)


def _plan_decode(
    meta: AttentionMetadata, rows: list[int] | None, seqs: list[int], block_size: int
) -> _DecodePlan:
    device = meta.block_tables.device
    lens = [meta.seq_lens_host[i] for i in seqs]
    max_len = max(lens)
    tables = meta.block_tables[:, : blocks_for(max_len, block_size)]
    if rows is not None:
        tables = tables[torch.tensor(seqs, device=device)]
    mask = None
    if min(lens) != max_len:
        lens_t = torch.tensor(lens, device=device)
        mask = (torch.arange(max_len, device=device)[None, :] < lens_t[:, None])[:, None, None]
    if rows is None:
        picked = None
    elif rows[-1] - rows[0] == len(rows) - 1:  # consecutive (increasing by construction)
        picked = slice(rows[0], rows[-1] + 1)
    else:
        picked = torch.tensor(rows, device=device)
    return _DecodePlan(
        rows=picked,
        block_ids=tables.long().clamp_min(0).flatten(),
        max_len=max_len,
        mask=mask,
        tables=tables.to(torch.int32).contiguous(),
        lens=torch.tensor(lens, dtype=torch.int32, device=device),
    )


def _prefill_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _PrefillPlan,
                    scale: float) -> torch.Tensor:
    """Causal attention of one chunk, `q` `[L, H, d]` over `k`, `v` `[kvh, S, d]`, as
    softmax(q k^T * scale + bias) v with the query heads of each kv head stacked into one
    matrix (GQA without repeating K/V). The bias (0 / -inf) is built once per step per
    sequence and shared by every layer; every row keeps at least its own position."""
    length, heads, d = q.shape
    kv_heads, seq_len, _ = k.shape
    group = heads // kv_heads
    if plan.bias is None:
        allowed = plan.mask if plan.mask is not None else torch.ones(
            length, seq_len, dtype=torch.bool, device=q.device).tril()
        plan.bias = torch.zeros(length, seq_len, dtype=torch.float32, device=q.device
                                ).masked_fill_(~allowed, float("-inf"))
    # [L, H, d] -> [kvh, group * L, d]: query head h = kv_head * group + j.
    qg = q.transpose(0, 1).reshape(kv_heads, group * length, d).float()
    scores = torch.bmm(qg, k.float().transpose(1, 2)).view(kv_heads, group, length, seq_len)
    scores.mul_(scale).add_(plan.bias)
    probs = torch.softmax(scores, dim=-1).view(kv_heads, group * length, seq_len)
    out = torch.bmm(probs, v.float()).view(heads, length, d)
    return out.transpose(0, 1).to(q.dtype)


def _paged_kernel_runs(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Our CPU decode kernel (`engine.layers.cpu_kernels`) reads the blocks in place where
    it can: float32 on an AVX2 host with the kernels built, head_dim a multiple of 8."""
    return (q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.dtype == torch.float32 and q.shape[-1] % 8 == 0
            and q.stride(-1) == 1 and k_cache.is_contiguous() and cpu_kernels.load())


def _prefill_kernel_runs(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Our CPU prefill kernel (`cpu_kernels.prefill_attention`, 2.6-3.8x SDPA's flash
    kernel) takes the chunk: float32 on an AVX-512 host with the kernels built, head_dim a
    multiple of 16 up to 256."""
    return (q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.dtype == torch.float32 and q.shape[-1] % 16 == 0
            and q.shape[-1] <= 256 and q.stride(-1) == 1 and k_cache.is_contiguous()
            and cpu_kernels.prefill_attention_on())


def _kept_slots(slot_mapping: torch.Tensor) -> torch.Tensor | None:
    keep = slot_mapping >= 0
    return None if bool(keep.all()) else keep


@register_backend
class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        # Whether the step has padded (-1) slots is the same for every layer: one host
        # sync per step, not per layer.
        keep = forward_context.step_cached(
            ("torch_attention.keep", id(self)), slot_mapping, lambda: _kept_slots(slot_mapping)
        )
        if keep is not None:
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        block_size = k_cache.shape[1]
        plan = forward_context.step_cached(
            ("torch_attention.plan", id(self)), meta, lambda: _plan(meta, block_size)
        )
        decode = plan.decode
        if decode is not None and decode.rows is None:  # a pure decode step
            return self._decode_batch(q, k_cache, v_cache, decode, scale)
        out = torch.empty_like(q)
        for p in plan.prefills:
            rows = slice(p.start, p.start + p.query_len)
            out[rows] = self._prefill_one(q[rows], k_cache, v_cache, p, scale)
        if decode is not None:
            out[decode.rows] = self._decode_batch(q[decode.rows], k_cache, v_cache, decode, scale)
        return out

    @staticmethod
    def _prefill_one(q, k_cache, v_cache, plan: _PrefillPlan, scale):
        if _prefill_kernel_runs(q, k_cache):
            if plan.table is None:  # int32 for the kernel, made once a step per sequence
                plan.table = plan.block_ids.to(torch.int32)
            return cpu_kernels.prefill_attention(q, k_cache, v_cache, plan.table,
                                                 plan.seq_len, scale)
        # [seq_len, kv_heads, d] -> [kv_heads, seq_len, d]
        k = gather_kv(k_cache, plan.block_ids, plan.seq_len).transpose(0, 1)
        v = gather_kv(v_cache, plan.block_ids, plan.seq_len).transpose(0, 1)
        if q.shape[1] * plan.query_len * plan.seq_len <= _MATMUL_PREFILL_MAX_SCORES:
            return _prefill_matmul(q, k, v, plan, scale)
        group = q.shape[1] // k.shape[0]
        if group > 1:  # a real copy (K/V of one chunk: small), so SDPA's flash kernel runs
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        # 4-D: CPU SDPA takes its flash kernel only for [batch, heads, len, d] inputs.
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            attn_mask=plan.mask, is_causal=plan.mask is None, scale=scale,
        )
        return o[0].transpose(0, 1)

    @staticmethod
    def _decode_batch(q, k_cache, v_cache, plan: _DecodePlan, scale):
        if _paged_kernel_runs(q, k_cache):
            return cpu_kernels.paged_decode_attention(q, k_cache, v_cache, plan.tables,
                                                      plan.lens, scale)
        b, h, d = q.shape
        kv_heads = k_cache.shape[2]
        # [B * n_blocks, bs, kvh, d] -> [B, kvh, max_len, d]
        k = k_cache.index_select(0, plan.block_ids).view(b, -1, kv_heads, d)
        v = v_cache.index_select(0, plan.block_ids).view(b, -1, kv_heads, d)
        k = k[:, : plan.max_len].transpose(1, 2)
        v = v[:, : plan.max_len].transpose(1, 2)
        # Group query heads by kv head instead of copying K/V per query head.
        qg = q.view(b, kv_heads, h // kv_heads, d)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.mask, scale=scale)
        return o.reshape(b, h, d)
