"""Reference paged attention in plain torch: correct everywhere, fast enough on CPU.

Prefill chunks are attended one sequence at a time (their causal masks differ); all decode
tokens of a step are gathered into one padded batch and attended in a single call, which
is what keeps CPU decode cheap at batch 16-64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, register_backend
from engine.attention.metadata import AttentionMetadata


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence as `[length, kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


@register_backend
class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        out = torch.empty_like(q)
        decode_rows: list[int] = []
        decode_seqs: list[int] = []
        start = 0
        for i, (qlen, slen) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            if qlen == 1:
                decode_rows.append(start)
                decode_seqs.append(i)
            elif qlen > 0:
                out[start : start + qlen] = self._prefill_one(
                    q[start : start + qlen], k_cache, v_cache, meta.block_tables[i], slen, scale
                )
            start += qlen
        if decode_rows:
            rows = torch.tensor(decode_rows, device=q.device)
            out[rows] = self._decode_batch(q[rows], k_cache, v_cache, meta, decode_seqs, scale)
        return out

    @staticmethod
    def _prefill_one(q, k_cache, v_cache, block_table, seq_len, scale):
        qlen = q.shape[0]
        k = gather_kv(k_cache, block_table, seq_len)
        v = gather_kv(v_cache, block_table, seq_len)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1).transpose(0, 1)
        v = v.repeat_interleave(groups, dim=1).transpose(0, 1)
        qh = q.transpose(0, 1)
        if qlen == seq_len:
            o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
        else:
            # Query j sits at position seq_len - qlen + j and sees keys up to that position.
            qpos = torch.arange(seq_len - qlen, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
        return o.transpose(0, 1)

    @staticmethod
    def _decode_batch(q, k_cache, v_cache, meta, seq_ids, scale):
        lens = [meta.seq_lens_host[i] for i in seq_ids]
        max_len = max(lens)
        block_size = k_cache.shape[1]
        n_blocks = (max_len + block_size - 1) // block_size
        tables = meta.block_tables[seq_ids, :n_blocks].long().clamp_min(0)
        # [B, n_blocks, bs, kvh, d] -> [B, kvh, n_blocks * bs, d]
        k = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
        v = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
        groups = q.shape[1] // k.shape[1]
        b, h, d = q.shape
        # Group query heads by kv head instead of copying K/V per query head.
        qg = q.view(b, k.shape[1], groups, d)
        lens_t = torch.tensor(lens, device=q.device)
        mask = torch.arange(max_len, device=q.device)[None, :] < lens_t[:, None]
        o = F.scaled_dot_product_attention(
            qg, k, v, attn_mask=mask[:, None, None, :], scale=scale
        )
        return o.reshape(b, h, d)
