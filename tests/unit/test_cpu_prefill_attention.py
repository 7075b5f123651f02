"""`cpu_kernels.prefill_attention`: our causal prefill attention for AVX-512 hosts (CI's),
against attention computed in float64 from the gathered blocks, and through the torch
backend against torch's own path (bmm + softmax or SDPA)."""

import pytest
import torch

from pdserve.engine.attention.torch_backend import TorchAttentionBackend, gather_kv
from pdserve.engine.layers import cpu_kernels
from tests.unit.test_triton_attention import make_batch

pytestmark = pytest.mark.skipif(
    not (cpu_kernels.host_supported() and cpu_kernels.prefill_attention_on()),
    reason="needs an x86 host with AVX-512")


def _case(new: int, seq_len: int, heads: int, kv_heads: int, d: int, seed: int,
          block_size: int = 16):
    """q for the last `new` of `seq_len` tokens, K/V in blocks handed out out of order (and
    spare blocks of garbage the kernel must never read)."""
    g = torch.Generator().manual_seed(seed)
    used = -(-seq_len // block_size)
    k_cache = torch.randn(used + 5, block_size, kv_heads, d, generator=g)
    v_cache = torch.randn(used + 5, block_size, kv_heads, d, generator=g)
    ids = torch.randperm(used + 5, generator=g)[:used].to(torch.int32)
    qkv = torch.randn(new, heads + 2 * kv_heads, d, generator=g)
    return qkv[:, :heads], k_cache, v_cache, ids  # q strided, as the model's


def _reference(q, k_cache, v_cache, ids, seq_len, scale):
    new, heads, _ = q.shape
    k = gather_kv(k_cache, ids, seq_len).double()
    v = gather_kv(v_cache, ids, seq_len).double()
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    sees = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - new, seq_len)[:, None]
    probs = scores.masked_fill(~sees, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).float()


@pytest.mark.parametrize("new,seq_len", [
    (1, 1), (5, 5), (64, 64), (65, 65), (130, 130),  # from scratch: ragged tiles and blocks
    (1, 300), (16, 1000), (100, 700), (368, 880),  # chunks on a cached prefix
])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_equals_float64_attention_over_the_gathered_blocks(new, seq_len, heads, kv_heads):
    q, kc, vc, ids = _case(new, seq_len, heads, kv_heads, 64, seed=new + seq_len + heads)
    got = cpu_kernels.prefill_attention(q, kc, vc, ids, seq_len, 0.125)
    torch.testing.assert_close(got, _reference(q, kc, vc, ids, seq_len, 0.125),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [16, 32, 80, 128, 192, 256])
def test_takes_every_head_dim_a_multiple_of_16(d):
    """The values pass keeps 64 dims in registers: wider heads take several passes, 80 and
    192 a partial last one."""
    q, kc, vc, ids = _case(37, 90, 6, 2, d, seed=d)
    scale = d ** -0.5
    got = cpu_kernels.prefill_attention(q, kc, vc, ids, 90, scale)
    torch.testing.assert_close(got, _reference(q, kc, vc, ids, 90, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len", [1024, 4096])
def test_row_lengths_of_whole_pages_give_the_same_result(seq_len):
    """Keys a multiple of 1024 long: the kernel pads its transposed rows off 4 KB strides;
    the result must not depend on it."""
    q, kc, vc, ids = _case(20, seq_len, 9, 3, 64, seed=seq_len)
    got = cpu_kernels.prefill_attention(q, kc, vc, ids, seq_len, 0.125)
    torch.testing.assert_close(got, _reference(q, kc, vc, ids, seq_len, 0.125),
                               rtol=1e-5, atol=1e-5)


def test_two_threads_give_the_rows_one_thread_gives():
    q, kc, vc, ids = _case(200, 260, 9, 3, 64, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.prefill_attention(q, kc, vc, ids, 260, 0.125)
        torch.set_num_threads(2)
        two = cpu_kernels.prefill_attention(q, kc, vc, ids, 260, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each row is summed in one order whatever the threads


def test_refuses_blocks_outside_the_cache_and_a_chunk_longer_than_its_sequence():
    q, kc, vc, ids = _case(10, 40, 9, 3, 64, seed=1)
    bad = ids.clone()
    bad[1] = kc.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.prefill_attention(q, kc, vc, bad, 40, 0.1)
    with pytest.raises(RuntimeError, match="new tokens of"):
        cpu_kernels.prefill_attention(q, kc, vc, ids, 5, 0.1)
    with pytest.raises(RuntimeError, match="block ids covering"):
        cpu_kernels.prefill_attention(q, kc, vc, ids, 40 + 16 * 5, 0.1)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        q8, kc8, vc8, ids8 = _case(3, 3, 2, 1, 8, seed=2)
        cpu_kernels.prefill_attention(q8, kc8, vc8, ids8, 3, 0.1)


def test_the_torch_backend_gives_the_same_rows_with_and_without_the_kernel():
    """A mixed step: chunks from scratch and on cached prefixes beside decode rows, GQA."""
    q, k_cache, v_cache, meta = make_batch([(0, 37), (21, 16), (40, 1), (0, 5), (70, 90)],
                                           heads=6, kv_heads=2, seed=3)
    calls = []
    kernel = cpu_kernels.prefill_attention
    try:
        cpu_kernels.prefill_attention = lambda *a: calls.append(a[4]) or kernel(*a)
        got = TorchAttentionBackend().forward(q, k_cache, v_cache, meta, 0.125)
        cpu_kernels.set_prefill_attention_enabled(False)
        want = TorchAttentionBackend().forward(q, k_cache, v_cache, meta, 0.125)
    finally:
        cpu_kernels.prefill_attention = kernel
        cpu_kernels.set_prefill_attention_enabled(True)
    assert calls == [37, 37, 5, 160]  # each prefill chunk once; none after it was turned off
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
