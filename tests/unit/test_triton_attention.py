"""Triton attention kernels against the torch reference, on CPU through the Triton interpreter.

Shapes are tiny because the interpreter runs every program in Python; tile sizes are forced
small (16) so that loops cross cache blocks, split-K runs several splits and the reduce
kernel merges them.
"""

from __future__ import annotations

from triton_interpret import use_interpreter

use_interpreter()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from pdserve.engine.attention.backend import get_backend  # noqa: E402
from pdserve.engine.attention.metadata import AttentionMetadata  # noqa: E402
from pdserve.engine.attention.torch_backend import TorchAttentionBackend, gather_kv  # noqa: E402
from pdserve.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pdserve.engine.attention.triton_kernels import AttentionTiles, plan_decode_splits  # noqa: E402
from pdserve.messages import blocks_for  # noqa: E402

SMALL = AttentionTiles(prefill_block_m=16, prefill_block_n=16, decode_block_n=16)
SPLIT16 = AttentionTiles(prefill_block_m=16, prefill_block_n=16, decode_block_n=16,
                         decode_split_size=16)


def make_batch(
    ctx_and_query: list[tuple[int, int]],
    *,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A paged batch: sequence i has `ctx` cached tokens and `query` new ones, all K/V written
    through the torch reference into blocks handed out in a random (non-contiguous) order.

    Returns (q, k_cache, v_cache, meta).
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in ctx_and_query]
    blocks_per_seq = [blocks_for(s, block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay zero and must never be read
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor([order.pop() for _ in range(n)])

    def slots(i: int, lo: int, hi: int) -> list[int]:
        return [int(block_tables[i, p // block_size]) * block_size + p % block_size
                for p in range(lo, hi)]

    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    all_slots = torch.tensor([s for i, n in enumerate(seq_lens) for s in slots(i, 0, n)])
    k = torch.randn(len(all_slots), kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(all_slots), kv_heads, head_dim, generator=gen).to(dtype)
    TorchAttentionBackend().write_kv(k, v, k_cache, v_cache, all_slots)

    query_lens = [n for _, n in ctx_and_query]
    new_slots = [s for i, (c, n) in enumerate(ctx_and_query) for s in slots(i, c, c + n)]
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                     dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.tensor(new_slots, dtype=torch.int64),
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return q, k_cache, v_cache, meta


def check_forward(batch, tiles: AttentionTiles, atol: float = 1e-4) -> None:
    q, k_cache, v_cache, meta = batch
    scale = q.shape[-1] ** -0.5
    want = TorchAttentionBackend().forward(q, k_cache, v_cache, meta, scale)
    got = TritonAttentionBackend(tiles).forward(q, k_cache, v_cache, meta, scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


def test_registry_finds_triton_and_auto_stays_torch_on_cpu():
    assert isinstance(get_backend("triton", "cpu"), TritonAttentionBackend)
    assert isinstance(get_backend("auto", "cpu"), TorchAttentionBackend)


def test_write_kv_matches_reference_and_skips_padding_slots():
    kv_heads, head_dim, block_size = 2, 64, 8
    k_ref = torch.zeros(6, block_size, kv_heads, head_dim)
    v_ref = torch.zeros_like(k_ref)
    k_got, v_got = k_ref.clone(), v_ref.clone()
    slots = torch.tensor([17, -1, 0, 47, 8, -1, 23], dtype=torch.int64)
    # A strided view, as a fused QKV projection hands it over.
    kv = torch.randn(len(slots), 2, kv_heads, head_dim)
    k, v = kv[:, 0], kv[:, 1]
    TorchAttentionBackend().write_kv(k, v, k_ref, v_ref, slots)
    TritonAttentionBackend().write_kv(k, v, k_got, v_got, slots)
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    assert int((k_got.flatten(0, 1).abs().sum((1, 2)) > 0).sum()) == 5  # -1 rows wrote nothing


def test_write_kv_casts_to_cache_dtype():
    # fp16, not bf16: the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.
    k_cache = torch.zeros(2, 8, 1, 64, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    TritonAttentionBackend().write_kv(k, v, k_cache, v_cache, torch.tensor([3, 9, 15]))
    assert torch.equal(k_cache.view(-1, 1, 64)[[3, 9, 15]], k.half())
    assert torch.equal(v_cache.view(-1, 1, 64)[[3, 9, 15]], v.half())


@pytest.mark.parametrize("tiles", [SMALL, SPLIT16], ids=["one_split", "split_k"])
def test_decode_ragged_contexts_across_blocks(tiles):
    batch = make_batch([(0, 1), (6, 1), (15, 1), (16, 1), (40, 1), (70, 1)], block_size=8)
    check_forward(batch, tiles)


def test_decode_split_plan_covers_context_and_reaches_target():
    tiles = AttentionTiles(decode_target_programs=64, decode_min_split=32, decode_block_n=16)
    split, n = plan_decode_splits(2, 2, 1000, tiles, torch.device("cpu"))
    assert split % 16 == 0 and split * n >= 1000 and split * (n - 1) < 1000
    assert n == 16  # 64 programs wanted / (2 seqs * 2 kv heads)
    capped = AttentionTiles(decode_split_size=16, decode_max_splits=8, decode_block_n=16)
    split, n = plan_decode_splits(1, 1, 1000, capped, torch.device("cpu"))
    assert n <= 8 and split * n >= 1000


def test_decode_gqa_group_of_four_head_dim_128():
    batch = make_batch([(20, 1), (33, 1)], heads=8, kv_heads=2, head_dim=128, block_size=16)
    check_forward(batch, SPLIT16)


def test_prefill_from_scratch_ragged():
    check_forward(make_batch([(0, 5), (0, 16), (0, 33)], block_size=8), SMALL)


def test_prefill_chunk_on_cached_prefix():
    # Chunk starts mid-block and spans several query tiles; a second one is block-aligned.
    check_forward(make_batch([(20, 29), (16, 8)], block_size=16), SMALL)


def test_prefill_default_tiles():
    check_forward(make_batch([(10, 23), (0, 7)], block_size=16), AttentionTiles())


def test_mixed_decode_and_prefill_batch():
    batch = make_batch([(9, 1), (12, 20), (30, 1), (0, 3), (47, 1)], block_size=8)
    check_forward(batch, SPLIT16)


def test_odd_head_dim_is_padded():
    check_forward(make_batch([(5, 1), (3, 9)], heads=2, kv_heads=1, head_dim=80), SPLIT16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    batch = make_batch([(18, 1), (7, 11)], dtype=dtype, block_size=8)
    check_forward(batch, SPLIT16, atol=2e-2)


def test_gather_kv_reads_only_the_blocks_holding_the_tokens():
    """A whole block-table row (int32, -1 padding after the used blocks) is a valid input:
    the GPU tests' SDPA reference passes rows like that."""
    cache = torch.randn(10, 4, 2, 3)
    row = torch.tensor([3, 5, 7, -1, -1], dtype=torch.int32)
    for length in (1, 4, 5, 6, 12):
        want = torch.cat([cache[3], cache[5], cache[7]])[:length]
        assert torch.equal(gather_kv(cache, row, length), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_prefill_matmul_path_equals_its_sdpa_path(monkeypatch, dtype):
    """The torch backend attends small prefill chunks with bmm + softmax and large ones with
    SDPA; both must give the same rows (chunks on a cached prefix, from scratch, with decode
    rows beside them, GQA). Our CPU prefill kernel, which takes float32 chunks on an
    AVX-512 host, is turned off (tests/unit/test_cpu_prefill_attention.py checks it)."""
    from pdserve.engine.attention import torch_backend
    from pdserve.engine.layers import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_prefill_attention_on", False)
    q, k_cache, v_cache, meta = make_batch([(0, 37), (21, 16), (40, 1), (0, 5), (70, 9)],
                                           heads=6, kv_heads=2, dtype=dtype, seed=3)
    scale = q.shape[-1] ** -0.5
    got = TorchAttentionBackend().forward(q, k_cache, v_cache, meta, scale)
    monkeypatch.setattr(torch_backend, "_MATMUL_PREFILL_MAX_SCORES", 0)
    want = TorchAttentionBackend().forward(q, k_cache, v_cache, meta, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
