"""The attention backend seam: write new K/V into the paged cache, attend over it.

Backends register by name (`register_backend`) and are picked by `get_backend`; "auto"
chooses Triton on CUDA and the torch reference elsewhere.

Invariants every backend keeps:
- `write_kv` stores row `t` of `k`/`v` at flat slot `slot_mapping[t]` of the layer's
  `[num_blocks, block_size, kv_heads, head_dim]` caches and skips slots equal to -1;
- `forward` is called after `write_kv` of the same step and reads *only* from the cache
  (new tokens included), causally: query row at position p sees cache positions <= p;
- GQA: query head h reads kv head `h // (num_heads // num_kv_heads)`;
- outputs are `[T, num_heads, head_dim]` in the dtype of `q`; no host sync.

`write_kv_rope` (rotate q and k, then `write_kv`) has a default built from the rope module
and `write_kv`; a backend may override it with one fused kernel (Triton does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from pdserve.engine.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """One implementation of paged attention."""

    name: str = ""

    @abstractmethod
    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Scatter `k`, `v` (`[T, kv_heads, head_dim]`) into the paged caches."""

    def write_kv_rope(
        self,
        rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                       tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate `q` and `k` by `rope(positions, q, k)`, store the rotated `k` and `v` as
        `write_kv` does, and return the rotated `q` (possibly `q` itself, rotated in place).
        `k` must not be used afterwards: it may or may not have been rotated."""
        q, k = rope(positions, q, k)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of `q` (`[T, heads, head_dim]`) over each sequence's cache."""


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: make a backend selectable by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def available_backends() -> list[str]:
    _load_builtin_backends()
    return sorted(_REGISTRY)


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """Instantiate the backend `name` ("auto": Triton on CUDA, torch otherwise)."""
    _load_builtin_backends()
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda"
        name = "triton" if on_cuda and "triton" in _REGISTRY else "torch"
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _load_builtin_backends() -> None:
    # Imported lazily so that a missing Triton never breaks the torch path.
    from pdserve.engine.attention import torch_backend  # noqa: F401

    try:
        from pdserve.engine.attention import triton_backend  # noqa: F401
    except ImportError:
        pass
