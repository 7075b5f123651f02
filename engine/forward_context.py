"""Per-step state the attention layers read, so `model.forward(input_ids, positions)` stays
clean: the attention metadata, the KV pool, the backend, and the KV connector's layer hooks:
one called before a layer's attention touches the KV (its loads must have landed), one
after the layer's K/V is written (layer-wise KV streaming to a decode worker hangs off it).

It also holds what every layer would otherwise derive again from the same step inputs
(`step_cached`): the rotary rows of the step's positions, the torch backend's plan of the
batch. On the CPU each such derivation is a handful of small ops, times the layer count.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.metadata import AttentionMetadata


@dataclass(slots=True)
class ForwardContext:
    meta: AttentionMetadata
    kv_cache: torch.Tensor  # [L, 2, num_blocks, block_size, kv_heads, head_dim]
    backend: AttentionBackend
    on_layer_written: Callable[[int], None] | None = None
    wait_for_layer: Callable[[int], None] | None = None
    # key -> (the object the value was derived from, the value); see `step_cached`.
    step_cache: dict[Hashable, tuple[Any, Any]] = field(default_factory=dict)


_CURRENT: ForwardContext | None = None
T = TypeVar("T")


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


def step_cached(key: Hashable, source: object, build: Callable[[], T]) -> T:
    """`build()` once per step for `source`, then the same value for every later layer.

    `source` is what the value is derived from (the step's positions tensor, its metadata);
    a hit needs that very object, so a stale value is never returned even if a key were
    reused with other inputs. The cache lives in the context, i.e. exactly one step: a CUDA
    graph capture builds its values inside the capture. Outside `use()` (a backend driven
    directly by a test) `build()` just runs.
    """
    ctx = _CURRENT
    if ctx is None:
        return build()
    hit = ctx.step_cache.get(key)
    if hit is not None and hit[0] is source:
        return hit[1]
    value = build()
    ctx.step_cache[key] = (source, value)
    return value
