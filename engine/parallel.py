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

    Ranks are numbered stage-major: global rank = `pp_rank * tp_size + tp_rank` (the
    driver, rank 0, is stage 0's TP rank 0). Stage s hands its hidden states to the same TP
    rank of stage s + 1 (`isend_next` / `recv_prev`, point-to-point on the world group);
    the last stage's TP rank 0 sends the logits to the driver (`isend_logits` /
    `irecv_logits`). Every pair of ranks sends and receives micro-batches in the same order.
    Every rank of a stage holds the full hidden states after its layers
    (the row-parallel all-reduce), so no gather is needed between stages.
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

    def shard_of(self, full: torch.Tensor, dim: int, shards: int) -> torch.Tensor:
        """This rank's slice of `full` along `dim` when it is cut into `shards` equal
        slices (`shards` divides `tp_size`, or `tp_size` divides it): with fewer slices than
        ranks each slice is replicated on `tp_size // shards` consecutive ranks (KV heads
        when TP exceeds their count, as vLLM does)."""
        if shards >= self.tp_size:
            return self.shard(full, dim)
        if self.tp_size % shards or full.shape[dim] % shards:
            raise ValueError(f"dim {dim} of size {full.shape[dim]} cannot be cut into "
                             f"{shards} slices replicated over {self.tp_size} ranks")
        n = full.shape[dim] // shards
        return full.narrow(dim, self.tp_rank * shards // self.tp_size * n, n)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the TP group, in place (row-parallel partial sums)."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.tp_group)
        return x

    @property
    def rank(self) -> int:
        """This rank's global rank in the replica's group (stage-major)."""
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def isend_next(self, x: torch.Tensor):
        """Hidden states to the same TP rank of the next stage, without waiting: the
        returned work must be waited on (and `x` kept alive) before the step ends."""
        import torch.distributed as dist

        return dist.isend(x.contiguous(), self.rank + self.tp_size)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
        """Hidden states from the same TP rank of the previous stage."""
        import torch.distributed as dist

        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, self.rank - self.tp_size)
        return x

    def isend_logits(self, logits: torch.Tensor):
        """The last stage's TP rank 0 hands a micro-batch's logits to the driver (rank 0)
        without waiting; None where nothing is sent (other TP ranks, no sampling rows)."""
        import torch.distributed as dist

        if self.tp_rank == 0 and self.rank != 0 and logits.numel():
            return dist.isend(logits.contiguous(), 0)
        return None

    def irecv_logits(self, shape: tuple[int, ...], device: torch.device):
        """On the driver: post the receive of the logits the last stage computes (fp32);
        returns (work, tensor): the tensor holds them once the work (None where nothing is
        sent) is waited for."""
        import torch.distributed as dist

        x = torch.empty(shape, dtype=torch.float32, device=device)
        if not x.numel():  # a step where nothing samples (a prompt's earlier chunk) sends none
            return None, x
        return dist.irecv(x, (self.pp_size - 1) * self.tp_size), x

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


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The model's KV heads `(first, count)` that tensor-parallel rank `tp_rank` holds.

    Split evenly when `tp_size` divides the head count; when TP exceeds it (`tp_size` a
    multiple of it) each head is replicated on `tp_size // num_kv_heads` consecutive ranks
    and rank r holds head `r * num_kv_heads // tp_size`, as vLLM does. ValueError otherwise.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} outside 0..{tp_size - 1}")
    if num_kv_heads % tp_size == 0:
        per = num_kv_heads // tp_size
        return tp_rank * per, per
    if tp_size % num_kv_heads == 0:
        return tp_rank * num_kv_heads // tp_size, 1
    raise ValueError(f"{num_kv_heads} KV heads can be neither split over nor replicated on "
                     f"tensor-parallel size {tp_size}")


def layers_per_stage(num_layers: int, pp_size: int) -> tuple[int, ...]:
    """How many decoder layers each pipeline stage holds: as even as possible, earlier
    stages take the remainder (stage 0 also runs the embedding, the last one the LM head)."""
    if not 1 <= pp_size <= num_layers:
        raise ValueError(f"{num_layers} layers cannot be split into {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    return tuple(base + (i < extra) for i in range(pp_size))
