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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("k", [576, 1536, 13, 8, 1])
def test_equals_f_linear(rows, k):
    """Every row count (tiles of 1/2/4 weight rows, 8-row passes), ragged K tails, output
    counts that are no multiple of a tile or of a parallel task (1000 = 15 * 64 + 40)."""
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


@pytest.mark.parametrize("rows", [1, 5, 40])
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
    positions = torch.tensor([0, 7, 2047, 300], dtype=torch.int64)
    qkv = torch.randn(4, (9 + 3 + 3) * 64)  # q and k are strided views, as in the model
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    q, k = q.view(4, 9, 64), k.view(4, 3, 64)
    with torch.inference_mode():
        ref_q, ref_k = rope(positions, q.clone(), k.clone())
        cpu_kernels.rope_(positions, q, k, rope.cos, rope.sin)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)  # elementwise: bit for bit
    with pytest.raises(RuntimeError, match="outside the table"):
        cpu_kernels.rope_(torch.tensor([0, 1, 2, 2048]), q, k, rope.cos, rope.sin)


@pytest.mark.parametrize("rows", [1, 3, 33])
def test_silu_mul_equals_the_reference(rows):
    cpu_kernels.load()
    x = torch.randn(rows, 2 * 1536) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(x), F.silu(gate) * up, rtol=2e-6, atol=2e-6)


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
