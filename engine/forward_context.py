"""Per-step state the attention layers read, so `model.forward(input_ids, positions)` stays
clean: the attention metadata, the KV pool, the backend, and an optional hook called after
each layer's K/V is written (layer-wise KV streaming to a decode worker hangs off it).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import AttentionMetadata


@dataclass(slots=True)
class ForwardContext:
    meta: AttentionMetadata
    kv_cache: torch.Tensor  # [L, 2, num_blocks, block_size, kv_heads, head_dim]
    backend: AttentionBackend
    on_layer_written: Callable[[int], None] | None = None


_CURRENT: ForwardContext | None = None


def current() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("attention called outside engine.forward_context.use()")
    return _CURRENT


@contextmanager
def use(ctx: ForwardContext):
    global _CURRENT
    prev, _CURRENT = _CURRENT, ctx
    try:
        yield ctx
    finally:
        _CURRENT = prev
