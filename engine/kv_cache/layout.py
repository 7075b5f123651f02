"""The KV layout contract shared by every worker and transport.

One pool tensor per worker holds the whole cache:

    kv[layer, 0 (K) | 1 (V), block, slot_in_block, kv_head, head_dim]

so that, for layer `l`, `kv[l, 0]` and `kv[l, 1]` are each
`[num_blocks, block_size, num_kv_heads, head_dim]` (DESIGN.md's per-layer layout) and a
block's K and V for one layer are two contiguous `block_size * num_kv_heads * head_dim`
runs. Transports move `kv[l, :, block_ids]` layer by layer.

Two keys decide whether two sides may exchange blocks (DESIGN.md, "Two keys"): the
`ContentKey` of `engine.config` (what the numbers mean; in every block hash) and the
`LayoutKey` of `engine.kv_cache.keys` (how a side holds them: block size, TP/PP split),
re-exported here. `handshake` compares both and refuses, naming the fields, whatever no
transport can bridge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.config import ModelConfig, torch_dtype
from pdserve.engine.kv_cache.keys import (  # noqa: F401 (re-exported: the layout contract)
    HandshakeError,
    LayoutKey,
    check_same_content,
    handshake,
)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape facts of one worker's KV pool (the worker's local shard under TP)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @classmethod
    def for_model(cls, model: ModelConfig, block_size: int, dtype: str, tp_size: int = 1):
        from pdserve.engine.parallel import kv_heads_of_rank

        heads = kv_heads_of_rank(model.num_kv_heads, tp_size, 0)[1]  # ValueError if neither
        return cls(model.num_layers, heads, model.head_dim,
                   block_size, dtype)

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes over all layers, K and V together."""
        elem = torch.empty((), dtype=torch_dtype(self.dtype)).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for(self, memory_bytes: int) -> int:
        n = memory_bytes // self.block_bytes
        if n < 1:
            raise ValueError(
                f"KV memory budget of {memory_bytes} bytes holds no block "
                f"({self.block_bytes} bytes each)"
            )
        return n

    def allocate(self, num_blocks: int, device: str | torch.device) -> torch.Tensor:
        """The zero-filled pool `[L, 2, num_blocks, block_size, kv_heads, head_dim]`."""
        return torch.zeros(
            (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim),
            dtype=torch_dtype(self.dtype),
            device=device,
        )
