"""The fused RoPE + K/V cache write kernel (`fused.rope_write_kv_`, the Triton backend's
`write_kv_rope`) against the separate kernels and the torch reference path (RotaryEmbedding
then `write_kv`), on CPU through the Triton interpreter."""

from __future__ import annotations

import dataclasses

from triton_interpret import use_interpreter

use_interpreter()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from pdserve.engine import forward_context  # noqa: E402
from pdserve.engine.attention import triton_kernels  # noqa: E402
from pdserve.engine.attention.metadata import AttentionMetadata  # noqa: E402
from pdserve.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pdserve.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pdserve.engine.config import RopeScaling  # noqa: E402
from pdserve.engine.layers import fused  # noqa: E402
from pdserve.engine.layers.norm_rope import RotaryEmbedding  # noqa: E402
from pdserve.engine.loader import synthetic  # noqa: E402
from pdserve.engine.models.fused_llama import (  # noqa: E402
    FusedRotaryEmbedding,
    set_fused_kernels,
    set_rope_write_kv_fusion,
    uses_rope_write_kv_fusion,
)
from pdserve.engine.models.llama import LlamaForCausalLM  # noqa: E402

LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)


def _config(heads=8, kv_heads=2, head_dim=64, scaling=LLAMA3, dtype=torch.float32):
    cfg = synthetic.synthetic_config("random:tiny", torch.device("cpu"), dtype)
    return dataclasses.replace(cfg, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                               rope_scaling=scaling)


def _case(cfg, positions, slots, dtype, block_size=8, num_blocks=6, seed=0):
    """q, k, v as strided views of one qkv row (as the model hands them over), and caches
    pre-filled with noise (a wrong slot shows as a changed or unchanged row)."""
    gen = torch.Generator().manual_seed(seed)
    t, h, kvh, d = len(positions), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = (2 * torch.randn(t, (h + 2 * kvh) * d, generator=gen)).to(dtype)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
    k_cache = torch.randn(num_blocks, block_size, kvh, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kvh, d, generator=gen).to(dtype)
    return (torch.tensor(positions), q, k, v, k_cache, v_cache,
            torch.tensor(slots, dtype=torch.int64))


def _separate(rope, positions, q, k, v, k_cache, v_cache, slots, triton: bool):
    """The unfused path: rotate (fused Triton kernel or torch reference), then write_kv
    (Triton or torch). Returns (q, k_cache, v_cache), inputs untouched."""
    q, k, k_cache, v_cache = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    if triton:
        fused.rope_(positions, q, k, rope.cos, rope.sin)
        triton_kernels.write_kv(k, v, k_cache, v_cache, slots)
    else:
        q, k = rope(positions, q, k)
        TorchAttentionBackend().write_kv(k, v, k_cache, v_cache, slots)
    return q, k_cache, v_cache


def _fused(rope, positions, q, k, v, k_cache, v_cache, slots):
    q, k, k_cache, v_cache = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    k_before = k.clone()
    fused.rope_write_kv_(positions, q, k, v, rope.cos, rope.sin, k_cache, v_cache, slots)
    assert torch.equal(k, k_before), "k itself is not written"
    return q, k_cache, v_cache


# (heads, kv_heads, head_dim, scaling, block_size, positions, slots): GQA groups of 4 and 2,
# MHA, 3 kv heads (a padded head block), head_dim 96 (a padded half), llama3 scaling or
# none; slots on both sides of block boundaries, in shuffled blocks, padding (-1) anywhere;
# positions of a ragged mixed batch (a 5-token prefill chunk at 60.., decodes at 0, 7, 1023).
CASES = {
    "gqa4_llama3": (8, 2, 64, LLAMA3, 8, [60, 61, 62, 63, 64, 0, 7, 1023],
                    [15, 16, 17, 23, 24, 0, -1, 47]),
    "gqa2_no_scaling": (4, 2, 128, None, 16, [3, 900, 901, 17, 0],
                        [-1, 31, 32, 63, 64]),
    "mha_3_heads_dim96": (3, 3, 96, LLAMA3, 8, [0, 1, 2, 100, 500, 501],
                          [8, 9, 10, -1, 7, 40]),
    "gqa_3_kv_heads_block4": (6, 3, 32, LLAMA3, 4, [5, 6, 7, 8, 9, 1000, 64],
                              [3, 4, 5, 6, 7, -1, 22]),
    "all_padding": (8, 2, 64, LLAMA3, 8, [4, 5], [-1, -1]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_kernel_bitwise_equals_separate_kernels(case, dtype):
    heads, kvh, d, scaling, bs, positions, slots = CASES[case]
    cfg = _config(heads, kvh, d, scaling)
    rope = RotaryEmbedding(cfg)
    inputs = _case(cfg, positions, slots, dtype, block_size=bs, num_blocks=64 // bs + 4)
    want = _separate(rope, *inputs, triton=True)
    got = _fused(rope, *inputs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # Padded rows and untouched slots keep the caches' old contents.
    k_cache = inputs[4]
    kept = torch.ones(k_cache.shape[0] * bs, dtype=torch.bool)
    kept[[s for s in slots if s >= 0]] = False
    assert torch.equal(got[1].flatten(0, 1)[kept], k_cache.flatten(0, 1)[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_kernel_matches_torch_reference(case, dtype):
    heads, kvh, d, scaling, bs, positions, slots = CASES[case]
    cfg = _config(heads, kvh, d, scaling)
    rope = RotaryEmbedding(cfg)
    inputs = _case(cfg, positions, slots, dtype, block_size=bs, num_blocks=64 // bs + 4)
    want = _separate(rope, *inputs, triton=False)
    got = _fused(rope, *inputs)
    for g, w in zip(got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
        else:  # the interpreter truncates fp32 -> bf16 where torch rounds: 1 ulp
            torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=2**-7)


def test_llama3_scaling_changes_the_rotation():
    """The kernel reads whatever tables the module built: with and without llama3 scaling
    the low frequencies differ at long positions, and each matches its own reference."""
    positions, slots = [1000, 2], [5, 6]
    outs = []
    for scaling in (LLAMA3, None):
        cfg = _config(scaling=scaling)
        rope = RotaryEmbedding(cfg)
        inputs = _case(cfg, positions, slots, torch.float32, seed=3)
        got = _fused(rope, *inputs)
        for g, w in zip(got, _separate(rope, *inputs, triton=False)):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
        outs.append(got[0])
    assert not torch.allclose(outs[0][0], outs[1][0], atol=1e-3)


def test_cache_dtype_cast_and_noncontiguous_q():
    """fp32 activations into an fp16 cache (cast after rounding to k's dtype, as write_kv
    does), through the backend, with q not unit-strided (copied, rotated, returned)."""
    cfg = _config(8, 2, 64)
    rope = RotaryEmbedding(cfg)
    positions, q, k, v, k_cache, v_cache, slots = _case(
        cfg, [0, 9, 70], [1, 2, 30], torch.float32)
    k_cache, v_cache = k_cache.half(), v_cache.half()
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) != 1
    assert q_t.stride(-1) != 1
    want_q, want_k, want_v = _separate(rope, positions, q, k, v, k_cache, v_cache, slots,
                                       triton=True)
    kc, vc = k_cache.clone(), v_cache.clone()
    got_q = TritonAttentionBackend().write_kv_rope(rope, positions, q_t, k.clone(), v, kc, vc,
                                                   slots)
    assert torch.equal(got_q, want_q) and torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_caches_with_a_block_stride_of_their_own():
    """K and V interleaved per block (`[blocks, 2, bs, kvh, d]` pool): the block stride is
    not block_size * slot stride, so a kernel that flattened slots would write elsewhere."""
    cfg = _config(8, 2, 64)
    rope = RotaryEmbedding(cfg)
    positions, q, k, v, _, _, slots = _case(cfg, [0, 9, 70, 71], [1, 12, 30, -1],
                                            torch.float32)
    pool = torch.randn(5, 2, 8, 2, 64, generator=torch.Generator().manual_seed(4))
    # (The torch write_kv needs mergeable slots; clones of the views would be dense.)
    ref_pool, got_pool = pool.clone(), pool.clone()
    assert ref_pool[:, 0].stride(0) != 8 * ref_pool[:, 0].stride(1)
    q_ref, k_ref = rope(positions, q, k)
    triton_kernels.write_kv(k_ref, v, ref_pool[:, 0], ref_pool[:, 1], slots)
    q_got = q.clone()
    fused.rope_write_kv_(positions, q_got, k, v, rope.cos, rope.sin, got_pool[:, 0],
                         got_pool[:, 1], slots)
    torch.testing.assert_close(q_got, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_pool, ref_pool, atol=1e-6, rtol=1e-6)
    assert not torch.equal(got_pool, pool)


def test_backends_write_kv_rope_agree_and_default_falls_back():
    cfg = _config()
    rope = RotaryEmbedding(cfg)
    positions, q, k, v, k_cache, v_cache, slots = _case(
        cfg, [3, 4, 5, 6], [7, 8, -1, 9], torch.float32)
    results = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        kc, vc = k_cache.clone(), v_cache.clone()
        got_q = backend.write_kv_rope(rope, positions, q.clone(), k.clone(), v, kc, vc, slots)
        results.append((got_q, kc, vc))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # A rope that is not a RotaryEmbedding: the Triton backend takes the default path.
    calls = []

    def identity_rope(pos, q_, k_):
        calls.append(len(pos))
        return q_, k_

    kc, vc = k_cache.clone(), v_cache.clone()
    got_q = TritonAttentionBackend().write_kv_rope(identity_rope, positions, q, k, v, kc, vc,
                                                   slots)
    assert calls == [4] and got_q is q
    assert torch.equal(kc.view(-1, *kc.shape[2:])[[7, 8, 9]], k[[0, 1, 3]])


def test_zero_tokens_is_a_no_op():
    cfg = _config()
    rope = RotaryEmbedding(cfg)
    positions, q, k, v, k_cache, v_cache, slots = _case(cfg, [], [], torch.float32)
    before = k_cache.clone()
    fused.rope_write_kv_(positions, q, k, v, rope.cos, rope.sin, k_cache, v_cache, slots)
    out = TritonAttentionBackend().write_kv_rope(FusedRotaryEmbedding(cfg), positions, q, k, v,
                                                 k_cache, v_cache, slots)
    assert out.shape == q.shape and torch.equal(k_cache, before)


# ---- the model: fusion on vs off, Triton backend (interpreted) -----------------------------


def _meta(ctx_and_query, block_size, blocks_per_seq):
    """Sequence i has `ctx` cached tokens and `query` new ones, in blocks
    [i * blocks_per_seq, (i + 1) * blocks_per_seq)."""
    tables = torch.tensor([[i * blocks_per_seq + j for j in range(blocks_per_seq)]
                           for i in range(len(ctx_and_query))], dtype=torch.int32)
    positions, slots, qlens, slens = [], [], [], []
    for i, (c, n) in enumerate(ctx_and_query):
        for p in range(c, c + n):
            positions.append(p)
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
        qlens.append(n)
        slens.append(c + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()],
                                     dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_lens_host=qlens, seq_lens_host=slens,
        max_query_len=max(qlens), max_seq_len=max(slens),
    )
    return meta, torch.tensor(positions)


def _run(model, backend, kv, steps):
    """Prefill chunks then a ragged decode step through the model; logits of each step."""
    outs = []
    for ids, meta, positions in steps:
        ctx = forward_context.ForwardContext(meta, kv, backend)
        with forward_context.use(ctx), torch.inference_mode():
            outs.append(model.compute_logits(model(ids, positions)))
    return outs


def test_model_with_fusion_on_equals_off_and_matches_reference():
    cfg = synthetic.synthetic_config("random:tiny", torch.device("cpu"), torch.float32)
    model = LlamaForCausalLM(cfg)
    model.load_weights(synthetic.random_weights(cfg, 0, torch.device("cpu"), torch.float32))
    bs, per_seq = 8, 4
    gen = torch.Generator().manual_seed(7)
    # Step 1: three prompts (9, 16, 3 tokens: mid-block, block-aligned, short); step 2: the
    # second prompt's next chunk of 5 (across a block boundary) mixed with two decodes.
    plan = [[(0, 9), (0, 16), (0, 3)], [(9, 1), (16, 5), (3, 1)]]
    steps = []
    for ctx_q in plan:
        meta, positions = _meta(ctx_q, bs, per_seq)
        ids = torch.randint(0, cfg.vocab_size, (len(positions),), generator=gen)
        steps.append((ids, meta, positions))

    def fresh_kv():
        return torch.zeros(cfg.num_layers, 2, 3 * per_seq, bs, cfg.num_kv_heads, cfg.head_dim)

    want = _run(model, TorchAttentionBackend(), fresh_kv(), steps)  # reference layers
    set_fused_kernels(model, True)
    assert uses_rope_write_kv_fusion(model)
    calls = []
    real = fused.rope_write_kv_

    def counting(*args):
        calls.append(1)
        return real(*args)

    fused.rope_write_kv_ = counting
    try:
        kv_on = fresh_kv()
        on = _run(model, TritonAttentionBackend(), kv_on, steps)
    finally:
        fused.rope_write_kv_ = real
    assert len(calls) == len(steps) * cfg.num_layers
    set_rope_write_kv_fusion(model, False)
    assert not uses_rope_write_kv_fusion(model)
    kv_off = fresh_kv()
    off = _run(model, TritonAttentionBackend(), kv_off, steps)
    assert torch.equal(kv_on, kv_off)
    for a, b, w in zip(on, off, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)
    set_rope_write_kv_fusion(model, True)
    # The torch backend under the fused layers takes the default write_kv_rope.
    torch.testing.assert_close(_run(model, TorchAttentionBackend(), fresh_kv(), steps)[-1],
                               want[-1], atol=1e-4, rtol=1e-4)
    set_fused_kernels(model, False)
    assert not uses_rope_write_kv_fusion(model)
    assert all(torch.equal(a, b) for a, b in
               zip(_run(model, TorchAttentionBackend(), fresh_kv(), steps), want))
