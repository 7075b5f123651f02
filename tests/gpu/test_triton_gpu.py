"""Triton attention at real sizes on CUDA, in bf16, against fp32 SDPA over gathered K/V.

Llama-3-8B-like heads (32 query / 8 kv heads, head_dim 128), block size 16, contexts up to
4k, batch 32. bf16 rounds q/k/v, the probabilities fed to the P@V product and the output;
1.5e-2 absolute+relative covers that with room, while any indexing or masking bug is off
by O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

from pdserve.engine.attention.metadata import AttentionMetadata  # noqa: E402
from pdserve.engine.attention.torch_backend import TorchAttentionBackend, gather_kv  # noqa: E402
from pdserve.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pdserve.messages import blocks_for  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
TOL = 1.5e-2


def make_batch(ctx_and_query, dtype=torch.bfloat16, seed=0, heads=HEADS, kv_heads=KV_HEADS):
    """Paged batch on CUDA with shuffled blocks; all K/V written by the torch reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    seq_lens = [c + n for c, n in ctx_and_query]
    per_seq = [blocks_for(s, BLOCK) for s in seq_lens]
    num_blocks = sum(per_seq) + 8
    order = torch.randperm(num_blocks, device=dev, generator=gen)
    tables = torch.full((len(seq_lens), max(per_seq)), -1, dtype=torch.int32, device=dev)
    starts = [0, *torch.tensor(per_seq).cumsum(0).tolist()]
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[starts[i] : starts[i] + n].int()

    def slots(i, lo, hi):
        pos = torch.arange(lo, hi, device=dev)
        return tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK

    k_cache = torch.zeros(num_blocks, BLOCK, kv_heads, HEAD_DIM, dtype=dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    all_slots = torch.cat([slots(i, 0, n) for i, n in enumerate(seq_lens)])
    shape = (len(all_slots), kv_heads, HEAD_DIM)
    k = torch.randn(shape, device=dev, generator=gen).to(dtype)
    v = torch.randn(shape, device=dev, generator=gen).to(dtype)
    TorchAttentionBackend().write_kv(k, v, k_cache, v_cache, all_slots)

    query_lens = [n for _, n in ctx_and_query]
    q = torch.randn(sum(query_lens), heads, HEAD_DIM, device=dev, generator=gen).to(dtype)
    cum = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(cum, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=tables,
        slot_mapping=torch.cat([slots(i, c, c + n) for i, (c, n) in enumerate(ctx_and_query)]),
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return q, k_cache, v_cache, meta


def sdpa_reference(q, k_cache, v_cache, meta, scale):
    """fp32 SDPA, one sequence at a time, causal with the cached-prefix offset."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    start = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        k = gather_kv(k_cache, meta.block_tables[i], slen).float()
        v = gather_kv(v_cache, meta.block_tables[i], slen).float()
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        mask = torch.arange(slen, device=q.device)[None, :] <= qpos
        qh = q[start : start + qlen].float().transpose(0, 1)
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
        out[start : start + qlen] = o.transpose(0, 1)
        start += qlen
    return out


def check(batch, atol=TOL):
    q, k_cache, v_cache, meta = batch
    scale = HEAD_DIM**-0.5
    got = TritonAttentionBackend().forward(q, k_cache, v_cache, meta, scale)
    want = sdpa_reference(q, k_cache, v_cache, meta, scale)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=atol)


def test_write_kv_matches_reference_bitwise():
    q, k_cache, v_cache, meta = make_batch([(0, 300), (40, 77)])
    slots = meta.slot_mapping.clone()
    slots[::7] = -1
    k = torch.randn(len(slots), KV_HEADS, HEAD_DIM, device="cuda")  # fp32 -> bf16 cast too
    v = torch.randn_like(k)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    TorchAttentionBackend().write_kv(k, v, ref_k, ref_v, slots)
    TritonAttentionBackend().write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_decode_batch_32_contexts_up_to_4k():
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 4097, (30,), generator=gen).tolist() + [1, 4096]
    check(make_batch([(n - 1, 1) for n in lens]))


def test_decode_single_long_sequence_uses_many_splits():
    check(make_batch([(4000, 1)]))


def test_prefill_from_scratch_ragged():
    check(make_batch([(0, 1000), (0, 37), (0, 2048), (0, 513)]))


def test_prefill_chunks_on_cached_prefix():
    check(make_batch([(3000, 512), (100, 700), (17, 2), (2048, 64)]))


def test_mixed_batch():
    gen = torch.Generator().manual_seed(2)
    decode = [(int(n), 1) for n in torch.randint(0, 4096, (24,), generator=gen)]
    batch = [*decode[:10], (0, 300), *decode[10:20], (1500, 256), *decode[20:], (33, 1024)]
    check(make_batch(batch))


def test_fp16_and_mha():
    check(make_batch([(700, 1), (60, 90)], dtype=torch.float16, heads=8, kv_heads=8))


def test_decode_replays_under_cuda_graph():
    """Captured once with max_seq_len = 4096, replayed with other lengths: the launch must
    not depend on anything but host fields fixed at capture (no sync, fixed split plan)."""
    backend = TritonAttentionBackend()
    q, k_cache, v_cache, meta = make_batch([(4095, 1)] * 8)
    scale = HEAD_DIM**-0.5
    backend.forward(q, k_cache, v_cache, meta, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k_cache, v_cache, meta, scale)
    new_lens = [4096, 1, 17, 300, 2049, 4000, 16, 1024]
    meta.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    meta.seq_lens_host = new_lens
    torch.testing.assert_close(out.float(), sdpa_reference(q, k_cache, v_cache, meta, scale),
                               atol=TOL, rtol=TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_write_kv_fused_equals_rope_then_write_kv(dtype):
    """RoPE + K/V cache write in one kernel against the fused RoPE kernel then write_kv
    (bitwise: the same fp32 arithmetic, the same roundings) and against the torch
    reference (RotaryEmbedding, torch write_kv), at Llama-3.1-8B head shapes with llama3
    rope scaling; decode rows of a batch of 32, a 300-token prefill chunk across blocks and
    padded (-1) rows; then replayed from a CUDA graph with new positions and slots."""
    import dataclasses

    from pdserve.engine.attention import triton_kernels
    from pdserve.engine.layers import fused
    from pdserve.engine.layers.norm_rope import RotaryEmbedding
    from pdserve.engine.loader import synthetic

    cfg = dataclasses.replace(
        synthetic.synthetic_config("random:llama-3.1-8b", torch.device("cuda"), dtype),
        max_position_embeddings=16384)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg.rope_scaling is not None
    rope = RotaryEmbedding(cfg).cuda()
    gen = torch.Generator(device="cuda").manual_seed(3)
    _, k_cache, v_cache, meta = make_batch(
        [(int(n), 1) for n in torch.randint(0, 8000, (32,), generator=torch.Generator())]
        + [(1000, 300)], dtype=dtype)
    slots = meta.slot_mapping.clone()
    slots[5::11] = -1
    positions = torch.cat([meta.seq_lens[:32].long() - 1,
                           torch.arange(1000, 1300, device="cuda")])
    t = len(positions)
    qkv = torch.randn(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", generator=gen)
    q, k, v = qkv.to(dtype).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                   KV_HEADS * HEAD_DIM], dim=-1)
    q, k, v = (x.view(t, -1, HEAD_DIM) for x in (q, k, v))

    def separate(q, k, kc, vc):
        q, k, kc, vc = q.clone(), k.clone(), kc.clone(), vc.clone()
        fused.rope_(positions, q, k, rope.cos, rope.sin)
        triton_kernels.write_kv(k, v, kc, vc, slots)
        return q, kc, vc

    want = separate(q, k, k_cache, v_cache)
    got_q, got_k, got_v = q.clone(), k_cache.clone(), v_cache.clone()
    fused.rope_write_kv_(positions, got_q, k.clone(), v, rope.cos, rope.sin, got_k, got_v,
                         slots)
    for g, w in zip((got_q, got_k, got_v), want):
        assert torch.equal(g, w)
    ref_q, ref_k = rope(positions, q, k)
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    TorchAttentionBackend().write_kv(ref_k, v, ref_kc, ref_vc, slots)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for g, w in zip((got_q, got_k, got_v), (ref_q, ref_kc, ref_vc)):
        torch.testing.assert_close(g.float(), w.float(), **tol)

    # Under a CUDA graph (as the decode step runs it): capture, then replay on new inputs.
    gq, gk, gv = q.clone(), k_cache.clone(), v_cache.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.rope_write_kv_(positions, gq, k, v, rope.cos, rope.sin, gk, gv, slots)
    positions.copy_(torch.randint(0, 16384, positions.shape, device="cuda", generator=gen))
    slots.copy_(slots.flip(0))
    gq.copy_(q), gk.copy_(k_cache), gv.copy_(v_cache)
    graph.replay()
    for g, w in zip((gq, gk, gv), separate(q, k, k_cache, v_cache)):
        assert torch.equal(g, w)


# ---- Triton GEMV (engine.layers.gemv) at Llama-3.1-8B projection shapes --------------------

GEMV_SHAPES = [(4096, 6144), (4096, 4096), (14336, 4096), (4096, 28672)]  # (in, out)


def _gemv_case(m, k, n, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16)
    return x, w, b


@pytest.mark.parametrize("k,n", GEMV_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 8])
def test_gemv_matches_f_linear_at_8b_shapes(k, n, m):
    """bf16, outputs ~N(0, 1): within a bf16 rounding or two of fp32 and of cuBLAS."""
    from pdserve.engine.layers.gemv import GemvConfig, gemv

    x, w, b = _gemv_case(m, k, n, seed=m + k + n)
    ref = F.linear(x.float(), w.float(), b.float())
    configs = [None]  # the defaults: sum kernel for one row, dot kernel for more
    if m == 1:
        configs.append(GemvConfig("dot", 16, 256, 4, 4))
    for cfg in configs:
        for bias in (None, b):
            out = gemv(x, w, bias, cfg)
            want = ref if bias is not None else ref - b.float()
            torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(out.float(), F.linear(x, w, bias).float(), atol=3e-2,
                                       rtol=3e-2)


def test_gemv_through_dense_replays_under_cuda_graph():
    """`dense` with the switch on, captured in a graph at 1 and 8 rows, replayed on new x."""
    from pdserve.engine.layers import linear

    before = (linear._triton_gemv, linear._gemv_max_weight_bytes)
    linear.set_triton_gemv(True, max_weight_bytes=None)
    try:
        for m in (1, 8):
            x, w, b = _gemv_case(m, 4096, 6144, seed=m)
            assert linear.uses_triton_gemv(x, w, b)
            linear.dense(x, w, b)  # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = linear.dense(x, w, b)
            for seed in (1, 2):
                x.copy_(torch.randn(x.shape, device="cuda",
                                    generator=torch.Generator(device="cuda").manual_seed(seed)))
                graph.replay()
                torch.testing.assert_close(out.float(), F.linear(x.float(), w.float(), b.float()),
                                           atol=2e-2, rtol=2e-2)
    finally:
        linear.set_triton_gemv(*before)
