"""`engine.layers.cpu_kernels`: our AVX2 GEMV for decode rows and the fused glue ops, built
with g++ against torch; equal to the torch reference they replace.

On an x86 host with AVX2 (CI's) it must build and load — `scripts/setup.sh` builds it, and a
host that should have it but silently falls back would lose the decode speed unnoticed.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.config import ModelConfig
from pdserve.engine.layers import cpu_kernels, linear
from pdserve.engine.layers.norm_rope import RMSNorm, RotaryEmbedding

pytestmark = pytest.mark.skipif(not cpu_kernels.host_supported(), reason="needs x86 with AVX2")


def test_builds_and_loads_on_this_host():
    assert cpu_kernels.load(), "the CPU kernels did not build or load (see the warning logged)"
    assert cpu_kernels.library_path().exists()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 16, 19])
@pytest.mark.parametrize("k", [576, 1536, 13, 8, 1])
def test_equals_f_linear(rows, k):
    """Every row count (tiles of 1/2/4 weight rows; past 8 rows, groups of 8 taking turns on
    a block of weight rows), ragged K tails, output counts that are no multiple of a tile, a
    block or a parallel task (1000 = 10 * 96 + 40, 40 = 3 * 12 + 4)."""
    torch.manual_seed(rows * 100 + k)
    x, w, b = torch.randn(rows, k), torch.randn(1000, k), torch.randn(1000)
    torch.testing.assert_close(cpu_kernels.gemv(x, w, b), F.linear(x, w, b), rtol=1e-5,
                               atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(cpu_kernels.gemv(x, w), F.linear(x, w), rtol=1e-5,
                               atol=1e-5 * k ** 0.5)


def test_leading_dims_and_a_non_contiguous_input():
    w = torch.randn(70, 32)
    x = torch.randn(2, 3, 64)[..., ::2]  # [2, 3, 32], strided
    torch.testing.assert_close(cpu_kernels.gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_dense_takes_decode_rows_and_leaves_the_rest_to_onednn():
    w = torch.randn(48, 24)
    cpu_kernels.set_routing(cpu_kernels.AVX2_ROUTING)
    try:
        with torch.inference_mode():
            most = cpu_kernels.MAX_ROWS
            for rows, ours in [(1, True), (most, True), (most + 1, False)]:
                x = torch.randn(rows, 24)
                assert cpu_kernels.usable(x, w, None) is ours
                if ours:  # the same kernel, the same sums: bit for bit
                    assert torch.equal(linear.dense(x, w), cpu_kernels.gemv(x, w))
            assert not cpu_kernels.usable(torch.randn(2, 24, dtype=torch.bfloat16),
                                       w.bfloat16(), None)
            assert not cpu_kernels.usable(torch.randn(2, 24), w.t().contiguous().t(), None)
    finally:
        cpu_kernels.set_routing(None)


def test_bad_arguments_are_refused_by_the_op():
    cpu_kernels.load()
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.pdserve.cpu_gemv(torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.pdserve.cpu_gemv(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


def _child(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


PROBE = """
import torch, torch.nn.functional as F
from pdserve.engine.layers import cpu_kernels, linear
x, w = torch.randn(2, 16), torch.randn(8, 16)
with torch.inference_mode():
    torch.testing.assert_close(linear.dense(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
print("loaded", cpu_kernels.load())
"""


def test_switched_off_by_the_environment():
    done = _child(PROBE, PDSERVE_CPU_KERNELS="0")
    assert done.returncode == 0, done.stderr
    assert "loaded False" in done.stdout


def test_no_compiler_falls_back_with_a_warning(tmp_path):
    """A fresh cache and a compiler that does not exist: one warning, oneDNN serves."""
    done = _child(PROBE, PDSERVE_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-g++"))
    assert done.returncode == 0, done.stderr
    assert "loaded False" in done.stdout
    assert "CPU kernels unavailable" in done.stderr
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.parametrize("rows", [1, 5, 40, 300])  # 300: split over threads (> 113 a thread)
def test_rms_norm_and_add_rms_norm_equal_the_reference(rows):
    cpu_kernels.load()
    norm = RMSNorm(576, 1e-5, torch.float32)
    norm.weight.data.uniform_(0.5, 1.5)
    x, res = torch.randn(rows, 576) * 3, torch.randn(rows, 576)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight, 1e-5), norm(x),
                                   rtol=2e-6, atol=2e-6)
        total, normed = cpu_kernels.add_rms_norm(x, res, norm.weight, 1e-5)
        assert torch.equal(total, x + res)  # one rounding, as torch's add
        torch.testing.assert_close(normed, norm(x + res), rtol=2e-6, atol=2e-6)
        # a strided view (rows of a wider buffer) reads the right elements
        wide = torch.randn(rows, 1000)
        torch.testing.assert_close(cpu_kernels.rms_norm(wide[:, 100:676], norm.weight, 1e-5),
                                   norm(wide[:, 100:676].contiguous()), rtol=2e-6, atol=2e-6)


def test_rope_in_place_equals_the_reference():
    cpu_kernels.load()
    config = ModelConfig(architecture="llama", vocab_size=100, hidden_size=576,
                         intermediate_size=1536, num_layers=1, num_heads=9, num_kv_heads=3,
                         head_dim=64,
                         rope_theta=100000.0, max_position_embeddings=2048)
    rope = RotaryEmbedding(config)
    # 4 tokens, and 800: rows split over threads (> 341 a thread)
    for positions in (torch.tensor([0, 7, 2047, 300]), torch.randint(0, 2048, (800,))):
        t = len(positions)
        qkv = torch.randn(t, (9 + 3 + 3) * 64)  # q and k are strided views, as in the model
        q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
        q, k = q.view(t, 9, 64), k.view(t, 3, 64)
        with torch.inference_mode():
            ref_q, ref_k = rope(positions, q.clone(), k.clone())
            cpu_kernels.rope_(positions, q, k, rope.cos, rope.sin)
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k)  # elementwise: bit for bit
    with pytest.raises(RuntimeError, match="outside the table"):
        cpu_kernels.rope_(torch.tensor([0, 1, 2, 2048]), q[:4], k[:4], rope.cos, rope.sin)


@pytest.mark.parametrize("rows,n", [(1, 1536), (3, 1536), (33, 1536), (200, 1536), (2, 13)])
def test_silu_mul_equals_the_reference(rows, n):
    """Vector lanes and a ragged tail; gates from -100 to 100 (exp saturating both ways)."""
    cpu_kernels.load()
    x = torch.randn(rows, 2 * n) * 4
    x[0, :5] = torch.tensor([-100.0, -88.0, 0.0, 88.0, 100.0])
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(x), F.silu(gate) * up, rtol=3e-6, atol=3e-6)


def test_a_cpu_engine_runs_the_fused_path_and_decodes_as_the_reference_layers():
    """The default CPU engine switches its model to our fused ops; greedy decoding through
    them equals decoding through the reference layers (GEMV on in both)."""
    from pdserve.engine.llm import LLM
    from pdserve.engine.models.fused_llama import set_fused_kernels, uses_fused_kernels
    from pdserve.engine.sampling_params import SamplingParams

    llm = LLM("smollm2-135m-instruct", num_blocks=64, enable_prefix_caching=False)
    model = llm.engine.executor.worker.runner.model
    assert uses_fused_kernels(model)
    assert all(m.fused_ops is cpu_kernels for m in model.modules() if hasattr(m, "fused_ops"))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", [5, 6, 7, 8] * 20]
    fused = [o.token_ids for o in llm.generate(prompts, params)]
    set_fused_kernels(model, False)
    assert not uses_fused_kernels(model)
    assert [o.token_ids for o in llm.generate(prompts, params)] == fused


def _paged_case(lens, block_size=16, kv_heads=3, heads=9, d=64, seed=0):
    """Caches with every sequence's tokens in shuffled blocks; tables padded with -1."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lens) + 1
    blocks = torch.randperm(len(lens) * width + 4, generator=g)
    k_cache = torch.randn(len(blocks), block_size, kv_heads, d, generator=g)
    v_cache = torch.randn(len(blocks), block_size, kv_heads, d, generator=g)
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        used = -(-n // block_size)
        tables[i, :used] = blocks[i * width: i * width + used].to(torch.int32)
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, d, generator=g)
    return qkv[:, :heads], k_cache, v_cache, tables  # q strided, as the model's


def _reference(q, k_cache, v_cache, tables, lens, scale):
    out = []
    for i, n in enumerate(lens):
        k = torch.cat([k_cache[b] for b in tables[i] if b >= 0])[:n].transpose(0, 1)
        v = torch.cat([v_cache[b] for b in tables[i] if b >= 0])[:n].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, scale=scale,
                                           enable_gqa=True)
        out.append(o.squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("lens", [[1], [16], [17, 5, 64, 33], [200] * 3])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_paged_decode_attention_equals_sdpa_over_gathered_kv(lens, heads, kv_heads):
    cpu_kernels.load()
    q, kc, vc, tables = _paged_case(lens, kv_heads=kv_heads, heads=heads, seed=len(lens))
    got = cpu_kernels.paged_decode_attention(q, kc, vc, tables,
                                             torch.tensor(lens, dtype=torch.int32), 0.125)
    torch.testing.assert_close(got, _reference(q, kc, vc, tables, lens, 0.125),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [8, 24, 80, 128, 136])
def test_paged_decode_attention_takes_every_head_dim_in_chunks_of_64(d):
    """The kernel keeps up to 64 head dims in registers: a head of 128 or 136 takes several
    passes (the last one partial), one of 8 or 24 a partial pass; lengths cover the eight-token
    groups and the tail."""
    cpu_kernels.load()
    lens = [7, 8, 9, 23, 64]
    q, kc, vc, tables = _paged_case(lens, d=d, seed=d)
    scale = d ** -0.5
    got = cpu_kernels.paged_decode_attention(q, kc, vc, tables,
                                             torch.tensor(lens, dtype=torch.int32), scale)
    torch.testing.assert_close(got, _reference(q, kc, vc, tables, lens, scale),
                               rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_refuses_a_block_outside_the_cache():
    cpu_kernels.load()
    q, kc, vc, tables = _paged_case([20])
    tables[0, 1] = kc.shape[0]
    def lens(n):
        return torch.tensor([n], dtype=torch.int32)

    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens(20), 0.1)
    with pytest.raises(RuntimeError, match="table entries"):
        cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens(200), 0.1)


def test_the_torch_backend_decodes_the_same_with_and_without_the_kernel():
    """A mixed step (a prefill chunk beside decode rows) and a pure decode step through the
    torch backend: our kernel on, then the gather + SDPA reference."""
    from pdserve.engine import forward_context
    from pdserve.engine.attention.metadata import AttentionMetadata
    from pdserve.engine.attention.torch_backend import TorchAttentionBackend

    def run(qlens, ctx, enabled):
        cpu_kernels.set_enabled(enabled)
        try:
            lens = [c + n for c, n in zip(ctx, qlens)]
            q, kc, vc, tables = _paged_case(lens, seed=3)
            q = torch.randn(sum(qlens), 9, 64, generator=torch.Generator().manual_seed(4))
            starts = [0]
            for n in qlens:
                starts.append(starts[-1] + n)
            meta = AttentionMetadata(
                query_start_loc=torch.tensor(starts, dtype=torch.int32),
                seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64), query_lens_host=qlens,
                seq_lens_host=lens, max_query_len=max(qlens), max_seq_len=max(lens))
            backend = TorchAttentionBackend()
            with forward_context.use(forward_context.ForwardContext(meta, None, backend)):
                return backend.forward(q, kc, vc, meta, 0.125)
        finally:
            cpu_kernels.set_enabled(True)

    for qlens, ctx in [([1, 1, 1], [40, 3, 17]), ([1, 7, 1], [30, 0, 70])]:
        torch.testing.assert_close(run(qlens, ctx, True), run(qlens, ctx, False),
                                   rtol=1e-5, atol=1e-5)


def test_the_routing_follows_the_host_and_an_avx512_host_leaves_float32_to_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_kernels.host_routing() == cpu_kernels.AVX2_ROUTING
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_kernels.host_routing() == cpu_kernels.AVX512_ROUTING
    w = torch.randn(48, 24)
    cpu_kernels.set_routing(cpu_kernels.AVX512_ROUTING)
    try:
        with torch.inference_mode():
            x = torch.randn(1, 24)
            got = linear.dense(x, w)
            # oneDNN's product, not our GEMV's: the two sum in other orders.
            torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
            calls = []
            monkeypatch.setattr(cpu_kernels, "gemv", lambda *a: calls.append(a))
            linear.dense(x, w)
            assert calls == []
            cpu_kernels.set_routing(cpu_kernels.AVX2_ROUTING)
            linear.dense(x, w)
            assert len(calls) == 1
    finally:
        cpu_kernels.set_routing(None)
    with pytest.raises(ValueError, match="rows past"):
        cpu_kernels.set_routing(cpu_kernels.Routing(gemv_rows=9, codes_rows=8, gemm_codes=True))
