"""The KV layout contract shared by every worker and transport.

One pool tensor per worker holds the whole cache:

    kv[layer, 0 (K) | 1 (V), block, slot_in_block, kv_head, head_dim]

so that, for layer `l`, `kv[l, 0]` and `kv[l, 1]` are each
`[num_blocks, block_size, num_kv_heads, head_dim]` (DESIGN.md's per-layer layout) and a
block's K and V for one layer are two contiguous `block_size * num_kv_heads * head_dim`
runs. Transports move `kv[l, :, block_ids]` layer by layer.

Two keys decide whether two sides may exchange blocks (DESIGN.md, "Two keys"): the
`ContentKey` of `engine.config` (what the numbers mean; in every block hash) and the
`LayoutKey` here (how a side holds them: block size, TP/PP split). `handshake` compares
both and refuses, naming the fields, whatever no transport can bridge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from pdserve.engine.config import ContentKey, ModelConfig, torch_dtype


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
        if model.num_kv_heads % tp_size:
            raise ValueError(
                f"{model.num_kv_heads} KV heads cannot be split over tensor-parallel size {tp_size}"
            )
        return cls(model.num_layers, model.num_kv_heads // tp_size, model.head_dim,
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


@dataclass(frozen=True, slots=True)
class LayoutKey:
    """How one side (a worker: all its ranks and stages) holds its KV blocks.

    `kv_heads_per_rank` is what each TP rank's pool holds; `layers_per_stage` how many
    layers each pipeline stage's pool holds, in stage order. Two sides with equal content
    keys but different layout keys hold the same numbers cut differently: only a transport
    that reshards may connect them.
    """

    block_size: int
    kv_heads_per_rank: int
    head_dim: int
    layers_per_stage: tuple[int, ...]
    tp_size: int
    pp_size: int
    dtype: str

    @classmethod
    def for_model(cls, model: ModelConfig, block_size: int, dtype: str, tp_size: int = 1,
                  pp_size: int = 1) -> LayoutKey:
        from pdserve.engine.parallel import layers_per_stage

        if model.num_kv_heads % tp_size:
            raise ValueError(
                f"{model.num_kv_heads} KV heads cannot be split over tensor-parallel size {tp_size}"
            )
        return cls(block_size, model.num_kv_heads // tp_size, model.head_dim,
                   layers_per_stage(model.num_layers, pp_size), tp_size, pp_size, dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers_per_stage"] = list(self.layers_per_stage)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayoutKey:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"LayoutKey fields must be exactly {sorted(names)}, got {sorted(d)}")
        return cls(**{**d, "layers_per_stage": tuple(int(n) for n in d["layers_per_stage"])})


class HandshakeError(ValueError):
    """Two sides cannot exchange KV blocks; the message names the fields that differ."""


# Layout fields some transport can bridge (by resharding KV heads or layers). None yet:
# every layout difference is refused at start-up instead of failing each transfer.
RESHARDABLE_FIELDS: frozenset[str] = frozenset()


def handshake(a_name: str, a_content: ContentKey, a_layout: LayoutKey,
              b_name: str, b_content: ContentKey, b_layout: LayoutKey,
              reshardable: frozenset[str] = RESHARDABLE_FIELDS) -> None:
    """Check that side `a` (say a prefill worker) may send KV to side `b` (a decode worker).

    Refuses, with a `HandshakeError` naming each differing field and both values
    ("prefill-0 tp_size=2, decode-0 tp_size=1"), a content mismatch of any kind and a
    layout difference in a field outside `reshardable`.
    """
    problems = []
    content = _differences(a_content.to_dict(), b_content.to_dict(), a_name, b_name)
    if content:
        problems.append(f"content differs (blocks would not mean the same thing): {content}")
    layout = _differences(a_layout.to_dict(), b_layout.to_dict(), a_name, b_name, reshardable)
    if layout:
        problems.append(f"KV layout differs and no transport reshards it yet: {layout}")
    if problems:
        raise HandshakeError(f"{a_name} cannot send KV to {b_name}: " + "; ".join(problems))


def check_same_content(a_name: str, a_content: ContentKey, b_name: str,
                       b_content: ContentKey) -> None:
    """Refuse (naming the fields) two sides whose blocks would not mean the same thing,
    whatever their layouts: they must not share block hashes or a KV store."""
    content = _differences(a_content.to_dict(), b_content.to_dict(), a_name, b_name)
    if content:
        raise HandshakeError(f"{a_name} and {b_name} serve different content: {content}")


def _differences(a: dict, b: dict, a_name: str, b_name: str,
                 allowed: frozenset[str] = frozenset()) -> str:
    return "; ".join(f"{a_name} {k}={a[k]}, {b_name} {k}={b[k]}"
                     for k in a if a[k] != b[k] and k not in allowed)
