"""Block copies between a node's pool (host shared memory, pinned: kv_store/pool.py) and a
CUDA engine's KV pool, off the compute stream.

A load is one batch per request: the stored slots go to the GPU in a few large DMA copies
(consecutive slots merged) into a staging buffer, and one `index_copy_` scatters them into
the request's blocks. A slot is one contiguous block over all layers while the engine's
block is `L * 2` runs a pool stride apart, so a direct copy would be `L * 2` small copies
per block; staging turns them into one large DMA plus one device kernel. Everything runs on
a side stream after the compute stream's earlier work; the forward pass waits for the
load's event before its first attention, and the slots stay pinned in the index until that
event completed.

Saves run on their own stream too, so a background save never serialises with the forward
pass on the legacy default stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.kv_store.pool import BlockPool

STAGING_BYTES = 64 << 20  # bounds the device memory a load borrows beside the KV pool


@dataclass(slots=True)
class PendingLoad:
    """A load in flight on the copy stream: `done` completes once its blocks are written."""

    start: torch.cuda.Event
    done: torch.cuda.Event
    nbytes: int

    def wait(self) -> float:
        """Block until the load completed; its device time in milliseconds."""
        self.done.synchronize()
        return self.start.elapsed_time(self.done)


class CudaBlockCopier:
    """Copies blocks between `BlockPool`s and the CUDA KV pool `kv_cache`
    (`[L, 2, num_blocks, block_size, kv_heads, head_dim]`). Loads are issued from the engine
    thread, saves from the saver thread: each has its own stream."""

    def __init__(self, kv_cache: torch.Tensor, staging_bytes: int = STAGING_BYTES):
        if kv_cache.device.type != "cuda":
            raise ValueError(f"CudaBlockCopier needs a CUDA KV pool, got {kv_cache.device}")
        self.kv = kv_cache
        self.device = kv_cache.device
        block_bytes = kv_cache[:, :, 0].numel() * kv_cache.element_size()
        self.staging_blocks = max(1, staging_bytes // block_bytes)
        self.load_stream = torch.cuda.Stream(self.device)
        self.save_stream = torch.cuda.Stream(self.device)
        self._staging: torch.Tensor | None = None  # made on the first load

    def load(self, pool: BlockPool, slots: Sequence[int], block_ids: Sequence[int]
             ) -> PendingLoad:
        """Start copying `slots` of `pool` into blocks `block_ids` (in order). The caller
        keeps the slots pinned and `pool` alive until `PendingLoad.wait` returned."""
        if len(slots) != len(block_ids):
            raise ValueError(f"{len(slots)} slots for {len(block_ids)} blocks")
        stream = self.load_stream
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        # The fresh blocks' earlier owners may still be read or written by queued kernels.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if self._staging is None:
                self._staging = torch.empty((self.staging_blocks, *self.kv.shape[:2],
                                             *self.kv.shape[3:]),
                                            dtype=self.kv.dtype, device=self.device)
            # From pinned memory, so that the host does not wait for the stream to drain.
            ids = torch.tensor(list(block_ids), dtype=torch.long).pin_memory().to(
                self.device, non_blocking=True)
            start.record(stream)
            n = self.staging_blocks
            for at in range(0, len(slots), n):
                chunk = slots[at:at + n]
                for first, k, count in _runs(chunk):
                    self._staging[first:first + count].copy_(pool.blocks[k:k + count],
                                                             non_blocking=True)
                staged = self._staging[:len(chunk)].movedim(0, 2)  # [L, 2, n, bs, H, D]
                self.kv.index_copy_(2, ids[at:at + len(chunk)], staged)
            done.record(stream)
        return PendingLoad(start, done, len(slots) * pool.block_bytes)

    def wait_loaded(self, pending: PendingLoad) -> None:
        """Make the current (compute) stream wait for `pending` without blocking the host."""
        torch.cuda.current_stream(self.device).wait_event(pending.done)

    def save_stream_context(self):
        """The saver thread copies blocks out under this: its own stream, after the work
        the compute stream had queued (the request's last KV writes)."""
        self.save_stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.save_stream)


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(index in `slots`, first slot, count) for each run of consecutive slots."""
    out: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if out and out[-1][1] + out[-1][2] == s:
            first, k, count = out[-1]
            out[-1] = (first, k, count + 1)
        else:
            out.append((i, s, 1))
    return out
