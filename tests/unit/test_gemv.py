"""The Triton GEMV (`engine.layers.gemv`) against `F.linear`, on CPU through the Triton
interpreter, at small odd shapes (N and K not multiples of the blocks), 1..8 rows, with and
without bias; and the rule by which `dense` picks it on CUDA."""

from __future__ import annotations

from triton_interpret import use_interpreter

use_interpreter()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pdserve.engine.layers import linear  # noqa: E402
from pdserve.engine.layers.gemv import GemvConfig, gemv, get_config, set_config  # noqa: E402

# Small blocks so the interpreter is quick and N, K cover several blocks plus a ragged one.
SUM = GemvConfig("sum", block_n=8, block_k=32, num_warps=4, num_stages=1)
DOT = GemvConfig("dot", block_n=16, block_k=32, num_warps=4, num_stages=2)


def _case(m, n, k, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, w, b


def _check(out, x, w, b):
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == x.dtype and out.shape == ref.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    else:  # one rounding of the fp32 sum (the interpreter truncates bf16: up to 1 ulp)
        torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=2e-2)
        torch.testing.assert_close(out.float(), F.linear(x, w, b).float(), rtol=1.6e-2,
                                   atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(37, 70), (8, 32), (19, 96)])
def test_sum_kernel_one_row(dtype, bias, n, k):
    x, w, b = _case(1, n, k, dtype, bias, seed=n + k)
    _check(gemv(x, w, b, SUM), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_dot_kernel_few_rows(dtype, bias, m):
    x, w, b = _case(m, 37, 70, dtype, bias, seed=m)
    _check(gemv(x, w, b, DOT), x, w, b)


@pytest.mark.parametrize("m", [1, 4])
def test_default_configs_and_leading_dims(m):
    """The real defaults (big blocks, mostly masked here) and x of shape [1, m, k]."""
    x, w, b = _case(m, 33, 40, torch.float32, True, seed=7)
    out = gemv(x.unsqueeze(0), w, b)
    assert out.shape == (1, m, 33)
    _check(out[0], x, w, b)


def test_strided_rows_of_x():
    """Rows of x that are a strided view (q|k|v split style): no copy needed."""
    x, w, b = _case(3, 21, 64, torch.float32, False, seed=3)
    wide = torch.randn(3, 100)
    wide[:, 10:74] = x
    _check(gemv(wide[:, 10:74], w, b, DOT), x, w, b)


def test_config_overrides():
    assert get_config(40, 48, 1).kernel == "sum" and get_config(40, 48, 4).kernel == "dot"
    set_config(40, 48, True, DOT)
    try:
        assert get_config(40, 48, 1) == DOT
        x, w, b = _case(1, 40, 48, torch.float32, True)
        _check(gemv(x, w, b), x, w, b)
    finally:
        set_config(40, 48, True, None)
    assert get_config(40, 48, 1).kernel == "sum"
    with pytest.raises(ValueError):
        set_config(40, 48, False, SUM)


def test_rejects_bad_inputs():
    x, w, _ = _case(9, 16, 32, torch.float32, False)
    with pytest.raises(ValueError):
        gemv(torch.randn(17, 32), w)  # more rows than the dot kernel pads to
    with pytest.raises(ValueError):
        gemv(x[:2], w, None, SUM)  # the sum kernel is one row
    with pytest.raises(ValueError):
        gemv(x[:1], w.t().contiguous().t())  # not contiguous


def test_dense_routing_rule():
    """`dense` picks the GEMV only when switched on, for <= 8 rows of bf16/fp16 by a
    contiguous same-dtype weight under the size limit (CUDA only: CPU keeps oneDNN)."""
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    before = (linear._triton_gemv, linear._gemv_max_weight_bytes)
    try:
        linear.set_triton_gemv(False)
        assert not linear.uses_triton_gemv(x, w)
        linear.set_triton_gemv(True)
        assert linear.uses_triton_gemv(x, w)
        assert linear.uses_triton_gemv(torch.randn(8, 32, dtype=torch.bfloat16), w)
        assert linear.uses_triton_gemv(torch.randn(2, 4, 32, dtype=torch.bfloat16), w)
        assert not linear.uses_triton_gemv(torch.randn(9, 32, dtype=torch.bfloat16), w)
        assert not linear.uses_triton_gemv(x.float(), w.float())  # fp32: cuBLAS
        assert not linear.uses_triton_gemv(x, w.half())
        assert not linear.uses_triton_gemv(x, w.t().contiguous().t())
        assert linear.uses_triton_gemv(x.half(), w.half(), torch.zeros(64).half())
        linear.set_triton_gemv(True, max_weight_bytes=64 * 32 * 2 - 1)
        assert not linear.uses_triton_gemv(x, w)
        linear.set_triton_gemv(True, max_weight_bytes=None)
        assert linear.uses_triton_gemv(x, w)
        # CPU never takes it: dense stays F.linear / oneDNN there.
        with torch.inference_mode():
            torch.testing.assert_close(linear.dense(x, w), F.linear(x, w), rtol=2e-2,
                                       atol=2e-2)
    finally:
        linear.set_triton_gemv(*before)
