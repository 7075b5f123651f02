"""Fused Triton kernels (RMSNorm, add+RMSNorm, RoPE, SiLU-mul) and the fused Llama path
against the torch reference, on CPU through the Triton interpreter."""

from __future__ import annotations

from triton_interpret import use_interpreter

use_interpreter()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pdserve.engine import forward_context  # noqa: E402
from pdserve.engine.attention.metadata import AttentionMetadata  # noqa: E402
from pdserve.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pdserve.engine.layers import fused  # noqa: E402
from pdserve.engine.layers.norm_rope import RMSNorm, RotaryEmbedding  # noqa: E402
from pdserve.engine.loader import synthetic  # noqa: E402
from pdserve.engine.models.fused_llama import set_fused_kernels, uses_fused_kernels  # noqa: E402
from pdserve.engine.models.llama import LlamaForCausalLM  # noqa: E402
from pdserve.messages import blocks_for  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _norm(dim, dtype, gen):
    norm = RMSNorm(dim, 1e-5, dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96])  # 96: the block is padded past the row
def test_rms_norm_and_add_rms_norm(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    norm = _norm(dim, dtype, gen)
    x = (3 * torch.randn(5, dim, generator=gen)).to(dtype)
    h = torch.randn(5, dim, generator=gen).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused.rms_norm(x, norm.weight, norm.eps), norm(x), **tol)
    total, normed = fused.add_rms_norm(x, h, norm.weight, norm.eps)
    if dtype == torch.float32:
        assert torch.equal(total, x + h)
    else:  # the interpreter truncates to bf16 where the GPU rounds to nearest: 1 ulp
        torch.testing.assert_close(total, x + h, atol=0, rtol=2**-7)
    torch.testing.assert_close(normed, norm(x + h), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_strided_qkv_views(dtype):
    cfg = synthetic.synthetic_config("random:tiny", torch.device("cpu"), dtype)
    rope = RotaryEmbedding(cfg)
    gen = torch.Generator().manual_seed(1)
    t, h, kvh, d = 7, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(dtype)
    positions = torch.tensor([0, 1, 5, 63, 64, 500, 1023])
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, kvh, d)
    want_q, want_k = rope(positions, q.clone(), k.clone())
    v_before = v.clone()
    fused.rope_(positions, q, k, rope.cos, rope.sin)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (2 * torch.randn(3, 2 * 1100, generator=gen)).to(dtype)  # > one 1024-column block
    gate, up = x.chunk(2, dim=-1)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused.silu_mul(x), F.silu(gate) * up, **tol)


def _forward(model, ids, kv_cache):
    """A prefill of one sequence through the model, torch attention, fresh cache."""
    n = len(ids)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks_for(n, 8), dtype=torch.int32)[None],
        slot_mapping=torch.arange(n),
        query_lens_host=[n], seq_lens_host=[n], max_query_len=n, max_seq_len=n,
    )
    step = forward_context.ForwardContext(meta, kv_cache.zero_(), TorchAttentionBackend())
    with forward_context.use(step), torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(n)))


def test_fused_model_matches_reference_and_switches_back():
    cfg = synthetic.synthetic_config("random:tiny", torch.device("cpu"), torch.float32)
    model = LlamaForCausalLM(cfg)
    model.load_weights(synthetic.random_weights(cfg, 0, torch.device("cpu"), torch.float32))
    kv = torch.zeros(cfg.num_layers, 2, 8, 8, cfg.num_kv_heads, cfg.head_dim)
    ids = torch.randint(0, cfg.vocab_size, (29,), generator=torch.Generator().manual_seed(3))
    want = _forward(model, ids, kv)
    set_fused_kernels(model, True)
    assert uses_fused_kernels(model)
    got = _forward(model, ids, kv)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    set_fused_kernels(model, False)
    assert not uses_fused_kernels(model)
    assert torch.equal(_forward(model, ids, kv), want)
