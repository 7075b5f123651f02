"""The CUDA fast path of the Llama model: the same modules and weights, fused kernels.

`engine.models.llama` stays the one definition of the model (and what the CPU runs).
`set_fused_kernels(model, True)` switches the decoder layers, the final norm and the rotary
embedding of one built model to the subclasses below, which only override `forward`:

    norm1 -> attention (q/k rotated in place by one kernel) -> [x + h, norm2] in one kernel
    -> gate|up -> silu*up in one kernel -> down projection with the residual added in the
    GEMM epilogue (addmm, beta=1)

so a layer runs ~11 kernels instead of ~40. Switching per instance, reversibly, lets a
benchmark compare both paths on the same weights; a CUDA graph captures whichever path
is active when it is captured.
"""

from __future__ import annotations

import torch

from engine.layers import fused
from engine.layers.norm_rope import RMSNorm, RotaryEmbedding
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel import tp_size


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)


class FusedRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        fused.rope_(positions, q, k, self.cos, self.sin)
        return q, k


class FusedLlamaDecoderLayer(LlamaDecoderLayer):
    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = self.self_attn(positions, fused.rms_norm(x, norm1.weight, norm1.eps))
        x, normed = fused.add_rms_norm(x, h, norm2.weight, norm2.eps)
        act = fused.silu_mul(self.mlp.gate_up_proj(normed))
        if tp_size() == 1:
            # The residual rides in the GEMM's C operand: no separate add kernel, and in
            # place (x is this layer's own buffer), so no copy of x into a new output.
            return x.addmm_(act, self.mlp.down_proj.weight.t())
        return x + self.mlp.down_proj(act)  # the all-reduce must not see the residual


_SWAPS = (
    (LlamaDecoderLayer, FusedLlamaDecoderLayer),
    (RMSNorm, FusedRMSNorm),
    (RotaryEmbedding, FusedRotaryEmbedding),
)


def set_fused_kernels(model: LlamaForCausalLM, enabled: bool) -> None:
    """Switch every decoder layer, norm and rotary embedding of `model` to the fused
    subclasses (`enabled`) or back to the reference classes. Weights are untouched."""
    for module in model.modules():
        for plain, fast in _SWAPS:
            if type(module) is (plain if enabled else fast):
                module.__class__ = fast if enabled else plain


def uses_fused_kernels(model: LlamaForCausalLM) -> bool:
    return any(type(m) is FusedLlamaDecoderLayer for m in model.modules())
