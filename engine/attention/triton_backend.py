"""Triton paged attention: the backend "auto" picks on CUDA.

A step may mix decode tokens (query_len 1) and prefill chunks. Both kernels are launched
over the whole batch and each skips, on the device, the sequences that belong to the other,
so dispatch needs no index lists, no host sync and no copies of `q`:

- pure decode (`max_query_len == 1`): the split-K decode kernel alone;
- no decode rows: the prefill kernel alone;
- mixed: prefill kernel for query_len > 1, decode kernel for query_len == 1.

Importing this module imports triton; the registry treats an ImportError as "no Triton".
"""

from __future__ import annotations

import torch

from pdserve.engine.attention import triton_kernels
from pdserve.engine.attention.backend import AttentionBackend, register_backend
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.attention.triton_kernels import AttentionTiles
from pdserve.engine.layers import fused
from pdserve.engine.layers.norm_rope import RotaryEmbedding


@register_backend
class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels; numerically matches the torch reference.

    Requires `q` in the caches' dtype (fp32, fp16 or bf16), `num_heads` a multiple of
    `num_kv_heads`, and a power-of-two block size. Any head_dim works (padded to a power of
    two >= 16 in registers; 64 and 128 waste nothing).
    """

    name = "triton"

    def __init__(self, tiles: AttentionTiles | None = None) -> None:
        self.tiles = tiles or AttentionTiles()

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        triton_kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def write_kv_rope(self, rope, positions, q, k, v, k_cache, v_cache, slot_mapping):
        """One kernel for RoPE of q and k and the K/V cache write (`fused.rope_write_kv_`),
        bit-identical to `rope` then `write_kv`, for the rotary modules whose cos/sin tables
        that kernel reads (HF rotate_half layout); any other `rope` takes the default."""
        if not isinstance(rope, RotaryEmbedding) or k.shape[0] == 0:
            return super().write_kv_rope(rope, positions, q, k, v, k_cache, v_cache,
                                         slot_mapping)
        triton_kernels._check_cache(k_cache, v_cache)
        if q.stride(-1) != 1:
            q = q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        fused.rope_write_kv_(positions, q, k, v, rope.cos, rope.sin, k_cache, v_cache,
                             slot_mapping)
        return q

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_tokens, num_heads, _ = q.shape
        assert num_heads % k_cache.shape[2] == 0, "num_heads must be a multiple of kv_heads"
        assert q.dtype == k_cache.dtype, f"q is {q.dtype} but the KV cache is {k_cache.dtype}"
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if num_tokens == 0:
            return out
        # Host-side lists only: deciding which kernels to launch never touches the device.
        has_decode = meta.max_query_len == 1 or 1 in meta.query_lens_host
        args = (q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens,
                meta.block_tables, scale, meta.num_seqs)
        if meta.max_query_len > 1:
            triton_kernels.prefill_attention(
                *args, meta.max_query_len, self.tiles, skip_decode=has_decode
            )
        if has_decode:
            triton_kernels.decode_attention(*args, meta.max_seq_len, self.tiles)
        return out
