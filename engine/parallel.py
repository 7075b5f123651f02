"""Tensor-parallel state of this process: rank, size and the collective to use.

The model code asks `tp_rank()`/`tp_size()` when it shards weights and calls
`tp_all_reduce` after row-parallel layers; with size 1 nothing is communicated. Workers
initialise it once (`init_tensor_parallel`) with `torch.distributed` already set up
(NCCL on GPU, gloo on CPU); the engine itself never starts processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class _TPState:
    rank: int = 0
    size: int = 1
    group: object | None = None


_STATE = _TPState()


def init_tensor_parallel(rank: int, size: int, group: object | None = None) -> None:
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} outside 0..{size - 1}")
    _STATE.rank, _STATE.size, _STATE.group = rank, size, group


def tp_rank() -> int:
    return _STATE.rank


def tp_size() -> int:
    return _STATE.size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _STATE.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=_STATE.group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard along the last dim (vocab-parallel logits)."""
    if _STATE.size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(_STATE.size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=-1)
