"""Attention metadata for one flattened, unpadded batch of prefill chunks and decode tokens.

The batch holds `B` sequences and `T` new tokens. Sequence `i` contributes
`query_lens[i]` new tokens — rows `query_start_loc[i]:query_start_loc[i+1]` of `q` — at
positions `seq_lens[i] - query_lens[i] .. seq_lens[i] - 1`; its earlier
`seq_lens[i] - query_lens[i]` tokens are already in the paged cache. A decode token is
simply a sequence with `query_lens[i] == 1`.

Built once per step by the model runner and shared by every layer, so `forward` of the
model stays `forward(input_ids, positions)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32 on device, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32 on device, KV length after this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32 on device, -1 past a sequence's end
    slot_mapping: torch.Tensor  # [T] int64 on device: block * block_size + offset; -1 = skip
    # Host copies, so launch grids and the reference loop need no device sync.
    query_lens_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
