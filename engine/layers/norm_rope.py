"""RMSNorm and rotary position embeddings (HF "rotate_half" layout, llama3 scaling)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pdserve.engine import forward_context
from pdserve.engine.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, then scale in the input dtype,
        # which is what HF does and what keeps bf16 outputs close to it.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    # float32 throughout, as HF computes it, so fp32 runs match it bit for bit.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly.
    low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelen > low_wl, inv / scaling.factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    return torch.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position up to the model's context length."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        inv = _inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).float()
        t = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotate `q` `[T, H, D]` and `k` `[T, Hkv, D]` by their token positions `[T]`.

        Returns new tensors: views of one `[T, H + Hkv, D]` result (q and k are rotated
        together, one set of elementwise ops instead of two).
        """
        # Every layer rotates by the same positions: look the rows up once per step.
        cos, sin = forward_context.step_cached(
            ("rope", id(self)), positions, lambda: self._rows(positions)
        )
        heads = q.shape[1]
        qk = _rotate(torch.cat([q, k], dim=1), cos, sin)
        return qk[:, :heads], qk[:, heads:]

    def _rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and *signed* sin rows `[T, 1, D]` of `positions`.

        HF rotates as `x * cos + cat(-x2, x1) * sin`. Moving the minus onto the table,
        `cat(x2, x1) * cat(-sin1, sin2)`, gives bit-identical products (negation is exact)
        and saves a negation per layer.
        """
        cos = self.cos[positions]
        sin = self.sin[positions]
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        return cos.unsqueeze(1), signed.unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    swapped = torch.cat([x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + swapped * signed_sin).to(x.dtype)
