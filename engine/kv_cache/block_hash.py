"""Chained block hashes (DESIGN.md): hash(parent hash, the block's token ids, compat key).

Only full blocks are hashed. The digest is stable across processes and hosts (blake2b over
a fixed byte encoding, never Python's randomised `hash`), so the same prefix gives the same
hashes on every worker and the global KV store can index them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

BlockHash = bytes
ROOT_HASH: BlockHash = b"\x00" * 16


def hash_block(parent: BlockHash, token_ids: Sequence[int], compat_key: str) -> BlockHash:
    """The 16-byte hash of one full block given its parent block's hash."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(compat_key.encode())
    return h.digest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    compat_key: str,
    parent: BlockHash = ROOT_HASH,
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`, chained from `parent`."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], compat_key)
        hashes.append(parent)
    return hashes
