"""The fast path of the Llama model: the same modules and weights, fused kernels — Triton
on CUDA (`engine.layers.fused`), our C++ ops on CPU (`engine.layers.cpu_kernels`).

`engine.models.llama` stays the one definition of the model (and what runs where no fused
kernels do).
`set_fused_kernels(model, True)` switches the decoder layers, their attention modules, the
final norm and the rotary embedding of one built model to the subclasses below, which only
override `forward` (or, for attention, its RoPE + cache-write step):

    norm1 -> qkv -> [RoPE of q and k + K/V cache write] in one kernel -> attention -> o_proj
    -> [x + h, norm2] in one kernel -> gate|up -> silu*up in one kernel -> down projection
    with the residual added in the GEMM epilogue (addmm, beta=1)

so a layer runs ~10 kernels instead of ~40. On CPU the last step is the GEMV plus an
in-place add (an addmm there is MKL's, which streams a decode step's weight slowly).
Switching per instance, reversibly, lets a benchmark compare both paths on the same
weights; a CUDA graph captures whichever path is active when it is captured.
`set_rope_write_kv_fusion(model, False)` keeps the fused path but rotates (one kernel) and
writes K/V (another) separately, as before that fusion.
"""

from __future__ import annotations

import torch

from pdserve.engine.layers import cpu_kernels
from pdserve.engine.layers.norm_rope import RMSNorm, RotaryEmbedding
from pdserve.engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

_triton_ops = None  # engine.layers.fused, imported on first use (it needs Triton)


class _UsesFusedOps:
    """Which module of fused functions a switched instance calls: Triton's unless
    `set_fused_kernels(..., kernels="cpu")` set ours on the instance."""

    fused_ops = None

    def ops(self):
        if self.fused_ops is not None:
            return self.fused_ops
        global _triton_ops
        if _triton_ops is None:
            from pdserve.engine.layers import fused

            _triton_ops = fused
        return _triton_ops


class FusedRMSNorm(_UsesFusedOps, RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops().rms_norm(x, self.weight, self.eps)


class FusedRotaryEmbedding(_UsesFusedOps, RotaryEmbedding):
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        self.ops().rope_(positions, q, k, self.cos, self.sin)
        return q, k


class FusedLlamaAttention(LlamaAttention):
    # Class default; `set_rope_write_kv_fusion` overrides it per instance.
    fuse_rope_write_kv: bool = True

    def rope_write_kv(self, ctx, positions, q, k, v, k_cache, v_cache) -> torch.Tensor:
        if not self.fuse_rope_write_kv:
            return super().rope_write_kv(ctx, positions, q, k, v, k_cache, v_cache)
        # The Triton backend does both in one kernel; others rotate, then write.
        return ctx.backend.write_kv_rope(self.rope, positions, q, k, v, k_cache, v_cache,
                                         ctx.meta.slot_mapping)


class FusedLlamaDecoderLayer(_UsesFusedOps, LlamaDecoderLayer):
    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops()
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = self.self_attn(positions, ops.rms_norm(x, norm1.weight, norm1.eps))
        x, normed = ops.add_rms_norm(x, h, norm2.weight, norm2.eps)
        act = ops.silu_mul(self.mlp.gate_up_proj(normed))
        if ops is cpu_kernels:  # x is this layer's own buffer (add_rms_norm made it)
            return x.add_(self.mlp.down_proj(act))
        if self.mlp.down_proj.parallel.tp_size == 1:
            # The residual rides in the GEMM's C operand: no separate add kernel, and in
            # place (x is this layer's own buffer), so no copy of x into a new output.
            return x.addmm_(act, self.mlp.down_proj.weight.t())
        return x + self.mlp.down_proj(act)  # the all-reduce must not see the residual


_SWAPS = (
    (LlamaDecoderLayer, FusedLlamaDecoderLayer),
    (LlamaAttention, FusedLlamaAttention),
    (RMSNorm, FusedRMSNorm),
    (RotaryEmbedding, FusedRotaryEmbedding),
)


def set_fused_kernels(model: LlamaForCausalLM, enabled: bool, kernels: str = "triton") -> None:
    """Switch every decoder layer, norm and rotary embedding of `model` to the fused
    subclasses (`enabled`) or back to the reference classes. Weights are untouched.
    `kernels`: "triton" (CUDA; interpreted on CPU under TRITON_INTERPRET=1) or "cpu" (ours,
    `engine.layers.cpu_kernels`, which must have loaded)."""
    if kernels not in ("triton", "cpu"):
        raise ValueError(f"kernels must be 'triton' or 'cpu', not {kernels!r}")
    for module in model.modules():
        for plain, fast in _SWAPS:
            if type(module) is (plain if enabled else fast):
                module.__class__ = fast if enabled else plain
                if enabled and isinstance(module, _UsesFusedOps):
                    module.fused_ops = cpu_kernels if kernels == "cpu" else None


def uses_fused_kernels(model: LlamaForCausalLM) -> bool:
    return any(type(m) is FusedLlamaDecoderLayer for m in model.modules())


def set_rope_write_kv_fusion(model: LlamaForCausalLM, enabled: bool) -> None:
    """On the fused path, do RoPE and the K/V cache write in one kernel (`enabled`, the
    default) or in two (the fused RoPE kernel, then the backend's `write_kv`). Reversible;
    recapture CUDA graphs after switching. No effect on the reference layers."""
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            module.fuse_rope_write_kv = enabled


def uses_rope_write_kv_fusion(model: LlamaForCausalLM) -> bool:
    return any(type(m) is FusedLlamaAttention and m.fuse_rope_write_kv for m in model.modules())
