"""Which shard of the model one rank holds, and the collectives its layers call.

A `ParallelContext` is handed to the model when it is built; every layer that shards a
weight or reduces partial sums keeps it, so two models of different TP layouts can live in
one process and nothing about parallelism is process-global. The executor that owns the
ranks (`engine.executor`) makes the context; the layers only read it.

Invariants: `0 <= tp_rank < tp_size`, `0 <= pp_rank < pp_size`; `tp_group` is a
`torch.distributed` process group of exactly `tp_size` ranks (NCCL on GPU, gloo on CPU)
whenever `tp_size > 1`, and is not needed otherwise (then no collective communicates).
Every rank of a TP group calls the same collectives in the same order: the executor
guarantees it by giving them the same step inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """This rank's place in the tensor- and pipeline-parallel layout of one model replica.

    Pipeline parallelism is described (`pp_rank`, `pp_size`) so that keys and step messages
    can carry it; no executor runs more than one stage yet.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tensor-parallel rank {self.tp_rank} outside 0..{self.tp_size - 1}")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pipeline rank {self.pp_rank} outside 0..{self.pp_size - 1}")

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous `1/tp_size` slice of `full` along `dim` (a view)."""
        if full.shape[dim] % self.tp_size:
            raise ValueError(
                f"dim {dim} of size {full.shape[dim]} cannot be split {self.tp_size} ways")
        n = full.shape[dim] // self.tp_size
        return full.narrow(dim, self.tp_rank * n, n)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the TP group, in place (row-parallel partial sums)."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's shard along the last dim (vocab-parallel logits)."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)


# The context of a model that is not split: rank 0 of 1, no communication.
SINGLE = ParallelContext()


def layers_per_stage(num_layers: int, pp_size: int) -> tuple[int, ...]:
    """How many decoder layers each pipeline stage holds: as even as possible, earlier
    stages take the remainder (stage 0 also runs the embedding, the last one the LM head)."""
    if not 1 <= pp_size <= num_layers:
        raise ValueError(f"{num_layers} layers cannot be split into {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    return tuple(base + (i < extra) for i in range(pp_size))
