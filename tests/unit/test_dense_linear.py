"""`engine.layers.linear.dense`: oneDNN with packed weights on CPU, equal to `F.linear`."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.layers import linear
from pdserve.engine.layers.linear import ColumnParallelLinear, RowParallelLinear, dense

pytestmark = pytest.mark.skipif(
    not linear._onednn_available(), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("rows", [1, 3, 16, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_equals_f_linear(rows, dtype):
    torch.manual_seed(rows)
    w = torch.randn(96, 40, dtype=dtype)
    b = torch.randn(96, dtype=dtype)
    x = torch.randn(rows, 40, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        torch.testing.assert_close(dense(x, w, b), F.linear(x, w, b), rtol=tol, atol=tol)
        torch.testing.assert_close(dense(x, w), F.linear(x, w), rtol=tol, atol=tol)


def test_packed_copy_is_made_once_and_reused():
    w = torch.randn(32, 16)
    x = torch.randn(12, 16)  # more rows than the CPU GEMV takes: oneDNN's packed path
    with torch.inference_mode():
        dense(x, w)
        packed = getattr(w, linear._PACKED_ATTR)
        dense(torch.randn(17, 16), w)
    assert getattr(w, linear._PACKED_ATTR) is packed


@pytest.mark.parametrize("layer_kind", ["column", "row"])
def test_loading_new_values_replaces_the_packed_copy(layer_kind):
    """A layer that already ran must multiply by the values loaded afterwards."""
    layer = (ColumnParallelLinear(16, 24, bias=False, dtype=torch.float32)
             if layer_kind == "column" else RowParallelLinear(16, 24, dtype=torch.float32))
    x = torch.randn(5, 16)
    first, second = torch.randn(24, 16), torch.randn(24, 16)
    with torch.inference_mode():
        layer.load(first)
        torch.testing.assert_close(layer(x), x @ first.T, rtol=1e-5, atol=1e-5)
        layer.load(second)
        torch.testing.assert_close(layer(x), x @ second.T, rtol=1e-5, atol=1e-5)


def test_without_onednn_the_plain_matmul_runs():
    w, x = torch.randn(8, 4), torch.randn(2, 4)
    linear.set_onednn_linear(False)
    try:
        with torch.inference_mode():
            out = dense(x, w)
        assert not hasattr(w, linear._PACKED_ATTR)
        torch.testing.assert_close(out, F.linear(x, w))
    finally:
        linear.set_onednn_linear(True)
