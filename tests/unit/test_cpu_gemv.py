"""`engine.layers.cpu_gemv`: our AVX2 GEMV for decode rows, built with g++ against torch.

On an x86 host with AVX2 (CI's) it must build and load — `scripts/setup.sh` builds it, and a
host that should have it but silently falls back would lose the decode speed unnoticed.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.layers import cpu_gemv, linear

pytestmark = pytest.mark.skipif(not cpu_gemv.host_supported(), reason="needs x86 with AVX2")


def test_builds_and_loads_on_this_host():
    assert cpu_gemv.load(), "the CPU GEMV did not build or load (see the warning logged)"
    assert cpu_gemv.library_path().exists()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("k", [576, 1536, 13, 8, 1])
def test_equals_f_linear(rows, k):
    """Every row count (tiles of 1/2/4 weight rows, 8-row passes), ragged K tails, output
    counts that are no multiple of a tile or of a parallel task (1000 = 15 * 64 + 40)."""
    torch.manual_seed(rows * 100 + k)
    x, w, b = torch.randn(rows, k), torch.randn(1000, k), torch.randn(1000)
    torch.testing.assert_close(cpu_gemv.gemv(x, w, b), F.linear(x, w, b), rtol=1e-5,
                               atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(cpu_gemv.gemv(x, w), F.linear(x, w), rtol=1e-5,
                               atol=1e-5 * k ** 0.5)


def test_leading_dims_and_a_non_contiguous_input():
    w = torch.randn(70, 32)
    x = torch.randn(2, 3, 64)[..., ::2]  # [2, 3, 32], strided
    torch.testing.assert_close(cpu_gemv.gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_dense_takes_decode_rows_and_leaves_the_rest_to_onednn():
    w = torch.randn(48, 24)
    with torch.inference_mode():
        for rows, ours in [(1, True), (cpu_gemv.MAX_ROWS, True), (cpu_gemv.MAX_ROWS + 1, False)]:
            x = torch.randn(rows, 24)
            assert cpu_gemv.usable(x, w, None) is ours
            if ours:  # the same kernel, the same sums: bit for bit
                assert torch.equal(linear.dense(x, w), cpu_gemv.gemv(x, w))
        assert not cpu_gemv.usable(torch.randn(2, 24, dtype=torch.bfloat16),
                                   w.bfloat16(), None)
        assert not cpu_gemv.usable(torch.randn(2, 24), w.t().contiguous().t(), None)


def test_bad_arguments_are_refused_by_the_op():
    cpu_gemv.load()
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.pdserve.cpu_gemv(torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.pdserve.cpu_gemv(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


def _child(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


PROBE = """
import torch, torch.nn.functional as F
from pdserve.engine.layers import cpu_gemv, linear
x, w = torch.randn(2, 16), torch.randn(8, 16)
with torch.inference_mode():
    torch.testing.assert_close(linear.dense(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
print("loaded", cpu_gemv.load())
"""


def test_switched_off_by_the_environment():
    done = _child(PROBE, PDSERVE_CPU_GEMV="0")
    assert done.returncode == 0, done.stderr
    assert "loaded False" in done.stdout


def test_no_compiler_falls_back_with_a_warning(tmp_path):
    """A fresh cache and a compiler that does not exist: one warning, oneDNN serves."""
    done = _child(PROBE, PDSERVE_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-g++"))
    assert done.returncode == 0, done.stderr
    assert "loaded False" in done.stdout
    assert "CPU GEMV kernel unavailable" in done.stderr
    assert not list(tmp_path.rglob("*.so"))
