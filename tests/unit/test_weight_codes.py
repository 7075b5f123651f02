"""`engine.layers.weight_codes` and the products over them (`csrc/cpu_gemv_codes.cpp`,
`csrc/cpu_gemm_codes.cpp`): GGUF Q4_1 / Q8_0 blocks found in float32 weights only where they
rebuild every weight exactly, products equal to F.linear over the float32 weight, `dense()`
routing every product by such a weight to them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.layers import cpu_kernels, linear, weight_codes

pytestmark = pytest.mark.skipif(not cpu_kernels.host_supported(), reason="needs x86 with AVX2")
_THREADS = torch.get_num_threads()
_avx512 = pytest.mark.skipif(not (cpu_kernels.load() and cpu_kernels.avx512_codes()),
                             reason="the host has no AVX-512")


def gguf_blocks(n: int, k: int, kind: str, seed: int = 0) -> np.ndarray:
    """Raw GGUF blocks (bytes) of an [n, k] tensor: Q4_1 = f16 d, f16 m, 16 bytes of
    nibbles; Q8_0 = f16 d, 32 int8. As llama.cpp's quantizers write them: a Q4_1 block's
    minimum has code 0 and its maximum 15, a Q8_0 block's largest magnitude +-127."""
    rng = np.random.default_rng(seed)
    blocks = n * k // 32
    d = (rng.random(blocks) * 0.02 + 1e-4).astype(np.float16)
    if kind == "q4":
        m = (-rng.random(blocks) * 0.1).astype(np.float16)
        qs = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
        qs[:, 0] = (qs[:, 0] & 0xF0) | 0x0
        qs[:, 1] = (qs[:, 1] & 0xF0) | 0xF
        return np.concatenate([d.view(np.uint8).reshape(-1, 2), m.view(np.uint8).reshape(-1, 2),
                               qs], axis=1)
    qs = rng.integers(-126, 127, (blocks, 32), dtype=np.int8)
    qs[:, 3] = np.where(rng.random(blocks) < 0.5, -127, 127)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), qs.view(np.uint8)], axis=1)


def dequantized(n: int, k: int, kind: str, seed: int = 0) -> torch.Tensor:
    """The float32 tensor the GGUF loader makes of those blocks (gguf-py's dequantizer)."""
    import gguf

    qtype = gguf.GGMLQuantizationType.Q4_1 if kind == "q4" else gguf.GGMLQuantizationType.Q8_0
    w = gguf.quants.dequantize(gguf_blocks(n, k, kind, seed), qtype)
    return torch.from_numpy(np.ascontiguousarray(w.astype(np.float32).reshape(n, k)))


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_codes_are_found_where_the_loader_made_the_weight_from_them(kind):
    w = dequantized(100, 96, kind)
    w[7, 32:64] = 0.25 if kind == "q4" else 0.0  # a constant block (as Q4_1 / Q8_0 code it)
    codes = weight_codes.find_codes(w)
    assert codes is not None and codes.kind == kind
    assert torch.equal(codes.dequantize(), w)  # bit for bit
    assert codes.nbytes < w.numel() * 4 / (5 if kind == "q4" else 3)


def test_weights_that_are_not_exact_codes_keep_float32():
    w = dequantized(64, 64, "q4")
    w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))  # one weight one ulp off
    assert weight_codes.find_codes(w) is None
    assert weight_codes.find_codes(torch.randn(64, 64)) is None
    assert weight_codes.find_codes(dequantized(8, 64, "q8")[:, :48].contiguous()) is None
    assert weight_codes.find_codes(dequantized(8, 64, "q8").double()) is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_the_codes_gemv_equals_f_linear_over_the_float32_weight(rows, kind):
    """Every tile shape (1..8 rows, groups of 8 past that), output counts that are no
    multiple of a tile, a block or a parallel task, with and without bias."""
    assert cpu_kernels.load()
    w = dequantized(1000, 576, kind, seed=rows)
    codes = weight_codes.find_codes(w)
    x, b = torch.randn(rows, 576), torch.randn(1000)
    tol = dict(rtol=1e-5, atol=1e-5 * 576 ** 0.5)
    torch.testing.assert_close(cpu_kernels.gemv_codes(x, codes, b), F.linear(x, w, b), **tol)
    torch.testing.assert_close(cpu_kernels.gemv_codes(x, codes), F.linear(x, w), **tol)


@pytest.mark.parametrize("rows", [1, 3, 17, 18, 19, 20, 64, 77])
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_the_codes_gemm_equals_f_linear_over_the_float32_weight(rows, kind):
    """Row counts that are and are not a multiple of the 4-row tile; 1000 outputs: no
    multiple of the 3-row tile nor of a task's 24-row block; with and without bias."""
    assert cpu_kernels.load()
    w = dequantized(1000, 160, kind, seed=rows)
    codes = weight_codes.find_codes(w)
    x, b = torch.randn(rows, 160), torch.randn(1000)
    tol = dict(rtol=1e-5, atol=1e-5 * 160 ** 0.5)
    torch.testing.assert_close(cpu_kernels.gemm_codes(x, codes, b), F.linear(x, w, b), **tol)
    torch.testing.assert_close(cpu_kernels.gemm_codes(x, codes), F.linear(x, w), **tol)


def test_a_gemm_row_does_not_depend_on_the_rows_beside_it():
    """Each output is summed in one order whatever the batch: a prompt gives the same
    hidden states alone as mixed into a step with other sequences' rows."""
    assert cpu_kernels.load()
    codes = weight_codes.find_codes(dequantized(300, 576, "q4"))
    x = torch.randn(45, 576)
    full = cpu_kernels.gemm_codes(x, codes)
    for lo, hi in [(0, 17), (3, 40), (44, 45)]:
        assert torch.equal(cpu_kernels.gemm_codes(x[lo:hi], codes), full[lo:hi])
    with torch.inference_mode():
        torch.set_num_threads(1)  # the threads split outputs, never a sum
        try:
            assert torch.equal(cpu_kernels.gemm_codes(x, codes), full)
        finally:
            torch.set_num_threads(_THREADS)


def test_the_op_refuses_what_it_cannot_take():
    assert cpu_kernels.load()
    codes = weight_codes.find_codes(dequantized(16, 64, "q4"))
    op = torch.ops.pdserve.cpu_gemv_codes
    with pytest.raises(RuntimeError, match="rows"):
        op(torch.randn(33, 64), codes.scales, codes.offsets, codes.codes, None)
    with pytest.raises(RuntimeError, match="scales"):
        op(torch.randn(2, 96), codes.scales, codes.offsets, codes.codes, None)
    with pytest.raises(RuntimeError, match="offsets"):
        op(torch.randn(2, 64), codes.scales, codes.offsets[:0], codes.codes, None)
    gemm = torch.ops.pdserve.cpu_gemm_codes
    with pytest.raises(RuntimeError, match="scales"):
        gemm(torch.randn(40, 96), codes.scales, codes.offsets, codes.codes, None)
    with pytest.raises(RuntimeError, match="offsets"):
        gemm(torch.randn(40, 64), codes.scales, codes.offsets[:0], codes.codes, None)
    with pytest.raises(RuntimeError, match="bias"):
        gemm(torch.randn(40, 64), codes.scales, codes.offsets, codes.codes, torch.randn(3))


def test_dense_reads_the_codes_gemv_for_decode_rows_and_the_gemm_past_them():
    assert cpu_kernels.load()
    w = dequantized(48, 64, "q8")
    weight_codes.attach(torch.nn.Module(), [w])
    codes = weight_codes.codes_of(w)
    assert codes is not None
    cpu_kernels.set_routing(cpu_kernels.AVX2_ROUTING)
    try:
        with torch.inference_mode():
            for rows, kernel in [(1, cpu_kernels.gemv_codes),
                                 (cpu_kernels.CODES_MAX_ROWS, cpu_kernels.gemv_codes),
                                 (cpu_kernels.CODES_MAX_ROWS + 1, cpu_kernels.gemm_codes),
                                 (300, cpu_kernels.gemm_codes)]:
                x = torch.randn(rows, 64)
                got = linear.dense(x, w)
                assert torch.equal(got, kernel(x, codes))
                torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)
            cpu_kernels.set_codes_enabled(False)
            try:
                x = torch.randn(2, 64)
                assert torch.equal(linear.dense(x, w), cpu_kernels.gemv(x, w))
            finally:
                cpu_kernels.set_codes_enabled(True)
            # An AVX-512 host's routing: the lanes GEMV for its rows (the row-layout GEMV
            # where the AVX-512 path is off), oneDNN past them.
            cpu_kernels.set_routing(cpu_kernels.AVX512_ROUTING)
            rows = cpu_kernels.AVX512_ROUTING.codes_rows
            x = torch.randn(rows, 64)
            if cpu_kernels.avx512_codes():
                lanes = weight_codes.lanes_of(w)
                assert torch.equal(linear.dense(x, w), cpu_kernels.gemv_lanes(x, lanes))
                x = torch.randn(cpu_kernels.AVX512_ROUTING.lanes_rows, 64)
                assert torch.equal(linear.dense(x, w), cpu_kernels.gemv_lanes(x, lanes))
            else:
                assert torch.equal(linear.dense(x, w), cpu_kernels.gemv_codes(x, codes))
            x = torch.randn(cpu_kernels.AVX512_ROUTING.lanes_rows + 1, 64)
            got = linear.dense(x, w)
            assert not torch.equal(got, cpu_kernels.gemm_codes(x, codes))
            torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)
    finally:
        cpu_kernels.set_routing(None)
    linear.forget_packed(w)  # values changed in place: the codes go with the packed copy
    assert weight_codes.codes_of(w) is None and weight_codes.lanes_of(w) is None


@pytest.mark.skipif(not linear._onednn_available(), reason="torch built without oneDNN")
def test_load_packs_exactly_the_weights_onednn_will_take_prompts_of():
    """`pack_for_prefill` makes oneDNN's copy of a weight whose prompt products oneDNN runs
    (every weight under the AVX-512 routing; on AVX2 only those without codes, since our
    GEMM over codes takes the rest) and no other, and prompt products then read that copy."""
    assert cpu_kernels.load()
    coded, plain = dequantized(48, 64, "q8"), torch.randn(40, 64)
    weight_codes.attach(torch.nn.Module(), [coded, plain])
    assert weight_codes.codes_of(coded) is not None and weight_codes.codes_of(plain) is None
    try:
        for routing, packs_coded in [(cpu_kernels.AVX2_ROUTING, False),
                                     (cpu_kernels.AVX512_ROUTING, True)]:
            for w in (coded, plain):
                if hasattr(w, linear._PACKED_ATTR):
                    delattr(w, linear._PACKED_ATTR)
            cpu_kernels.set_routing(routing)
            assert linear.pack_for_prefill([coded, plain]) == 1 + packs_coded
            assert hasattr(coded, linear._PACKED_ATTR) == packs_coded
            made = getattr(plain, linear._PACKED_ATTR)
            x = torch.randn(100, 64)
            with torch.inference_mode():
                torch.testing.assert_close(linear.dense(x, plain), F.linear(x, plain),
                                           rtol=1e-5, atol=1e-4)
            assert getattr(plain, linear._PACKED_ATTR) is made  # used, not made again
    finally:
        cpu_kernels.set_routing(None)
        linear.forget_packed(coded)
        linear.forget_packed(plain)


def test_the_bundled_gguf_decodes_from_its_codes_as_from_float32():
    """SmolLM2-135M's GGUF is Q4_1 with a Q8_0 embedding (the tied LM head): every one of
    its 121 weights is read as codes, prefill and decode, and greedy tokens equal the
    float32 path's."""
    from pdserve.engine.llm import LLM
    from pdserve.engine.sampling_params import SamplingParams

    llm = LLM("smollm2-135m-instruct", num_blocks=64, enable_prefix_caching=False)
    model = llm.engine.executor.worker.runner.model
    kinds = (linear.MergedColumnLinear, linear.RowParallelLinear)
    weights = [m.weight for m in model.modules() if isinstance(m, kinds)]
    weights.append(model.lm_head.weight)
    found = [weight_codes.codes_of(w) for w in weights]
    assert len(weights) == 121 and all(c is not None for c in found)
    assert {c.kind for c in found} == {"q4", "q8"}
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", [5, 6, 7, 8] * 12, "def fib(n):"]
    with_codes = [o.token_ids for o in llm.generate(prompts, params)]
    # Where the host's routing gives prefill rows to the codes GEMM, oneDNN's packed float32
    # copy is never made; where it gives them to oneDNN (AVX-512), it is.
    packed = any(hasattr(w, linear._PACKED_ATTR) for w in weights)
    assert packed is not cpu_kernels.routing().gemm_codes
    cpu_kernels.set_codes_enabled(False)
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == with_codes
    finally:
        cpu_kernels.set_codes_enabled(True)


def _fresh(weights):
    return [w.clone() for w in weights]  # the same values, no codes attached yet


def test_codes_found_once_are_kept_and_a_later_start_reads_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    weights = [dequantized(64, 96, "q4"), dequantized(32, 64, "q8"), torch.randn(16, 64)]
    first = _fresh(weights)
    weight_codes.attach(torch.nn.Module(), first)
    kept = list((tmp_path / "codes").glob("*.safetensors"))
    assert len(kept) == 1

    def no_search(w):
        raise AssertionError("searched although the codes were kept")

    monkeypatch.setattr(weight_codes, "find_codes", no_search)
    again = _fresh(weights)
    weight_codes.attach(torch.nn.Module(), again)
    for a, b in zip(first, again):
        ca, cb = weight_codes.codes_of(a), weight_codes.codes_of(b)
        assert (ca is None) == (cb is None)
        if ca is not None:
            assert ca.kind == cb.kind and torch.equal(cb.dequantize(), b)
    assert weight_codes.codes_of(again[2]) is None


def test_kept_codes_that_no_longer_rebuild_the_weight_are_searched_again(tmp_path,
                                                                         monkeypatch):
    """The file's name samples the values; one changed value it did not sample is caught
    by the check of every value against the kept codes."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    w = dequantized(128, 96, "q4")  # 12288 values: every third is sampled
    weight_codes.attach(torch.nn.Module(), [w.clone()])
    changed = w.clone()
    changed[0, 1] = torch.nextafter(changed[0, 1], torch.tensor(9.0))  # not sampled
    assert weight_codes._fingerprint([changed]) == weight_codes._fingerprint([w])
    weight_codes.attach(torch.nn.Module(), [changed])
    assert weight_codes.codes_of(changed) is None  # searched: no longer exact codes
    (path,) = (tmp_path / "codes").glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    again = w.clone()
    weight_codes.attach(torch.nn.Module(), [again])  # unreadable: searched, rewritten
    assert torch.equal(weight_codes.codes_of(again).dequantize(), w)
    good = weight_codes.find_codes(w)  # a file whose parts do not fit together
    weight_codes._keep(path, [weight_codes.WeightCodes("q4", good.scales[:64],
                                                       good.offsets[:64], good.codes)])
    again = w.clone()
    weight_codes.attach(torch.nn.Module(), [again])  # not used, searched, rewritten
    assert torch.equal(weight_codes.codes_of(again).dequantize(), w)
    monkeypatch.setattr(weight_codes, "find_codes", lambda w: None)
    last = w.clone()
    weight_codes.attach(torch.nn.Module(), [last])
    assert weight_codes.codes_of(last) is not None  # read from the rewritten file


@_avx512
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_the_avx512_products_equal_the_avx2_ones_and_keep_rows_batch_invariant(kind):
    w = dequantized(100, 256, kind)  # 100 rows: every tile width and its remainder
    weight_codes.attach(torch.nn.Module(), [w])
    codes = weight_codes.codes_of(w)
    b = torch.randn(100)
    try:
        for rows, product in [(1, cpu_kernels.gemv_codes), (3, cpu_kernels.gemv_codes),
                              (13, cpu_kernels.gemv_codes), (16, cpu_kernels.gemv_codes),
                              (17, cpu_kernels.gemm_codes), (70, cpu_kernels.gemm_codes)]:
            x = torch.randn(rows, 256)
            assert cpu_kernels.avx512_codes(True)
            wide = product(x, codes, b)
            assert not cpu_kernels.avx512_codes(False)
            narrow = product(x, codes, b)
            # The same weights, summed in another order: close, and not the same bits.
            torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(wide, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
            assert cpu_kernels.avx512_codes(True)
            for lo, hi in [(0, 1), (rows // 2, rows)]:
                assert torch.equal(product(x[lo:hi], codes, b), wide[lo:hi])
        assert not torch.equal(wide, narrow)
    finally:
        cpu_kernels.avx512_codes(True)


def _from_lanes(lanes: weight_codes.LaneCodes) -> torch.Tensor:
    """The float32 weight the lanes layout holds, read as its docstring says."""
    tiles, blocks = lanes.scales.shape[:2]
    c = lanes.codes.movedim(-1, 1)  # [tiles, 16, blocks, j]: one output row a line
    if lanes.kind == "q4":
        q = torch.cat([c & 0xF, c >> 4], dim=-1).float()
        m = lanes.offsets.movedim(-1, 1).unsqueeze(-1)
    else:
        q, m = c.float(), 0.0
    w = lanes.scales.movedim(-1, 1).unsqueeze(-1) * q + m
    return w.reshape(tiles * 16, blocks * 32)[:lanes.n]


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("n", [5, 16, 100])
def test_the_lanes_layout_holds_the_same_weights(kind, n):
    """Any host: 16 output rows a tile, padded with zeros past the weight's rows."""
    w = dequantized(n, 96, kind, seed=n)
    lanes = weight_codes.to_lanes(weight_codes.find_codes(w))
    assert lanes.n == n and lanes.scales.shape == (-(-n // 16), 3, 16)
    assert torch.equal(_from_lanes(lanes), w)
    pad = slice(n % 16 or 16, None)  # the last tile's lanes past row n
    assert not lanes.codes[-1, ..., pad].any() and not lanes.scales[-1, :, pad].any()


@_avx512
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 12, 16, 17, 33, 64])
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_the_lanes_gemv_equals_f_linear_and_keeps_rows_batch_invariant(rows, kind):
    """Every tile of input rows (1..8, balanced groups past 8) and output tiles that are no
    multiple of a parallel task, the last one part padding; with and without bias."""
    w = dequantized(1000, 576, kind, seed=rows)
    lanes = weight_codes.to_lanes(weight_codes.find_codes(w))
    x, b = torch.randn(rows, 576), torch.randn(1000)
    tol = dict(rtol=1e-5, atol=1e-5 * 576 ** 0.5)
    full = cpu_kernels.gemv_lanes(x, lanes, b)
    torch.testing.assert_close(full, F.linear(x, w, b), **tol)
    torch.testing.assert_close(cpu_kernels.gemv_lanes(x, lanes), F.linear(x, w), **tol)
    for lo, hi in [(0, 1), (rows // 2, rows)]:  # a row's sums do not depend on its batch
        assert torch.equal(cpu_kernels.gemv_lanes(x[lo:hi], lanes, b), full[lo:hi])
    torch.set_num_threads(1)  # the threads split output tiles, never a sum
    try:
        assert torch.equal(cpu_kernels.gemv_lanes(x, lanes, b), full)
    finally:
        torch.set_num_threads(_THREADS)


@_avx512
def test_the_lanes_op_refuses_what_it_cannot_take():
    lanes = weight_codes.to_lanes(weight_codes.find_codes(dequantized(40, 64, "q4")))
    op = torch.ops.pdserve.cpu_gemv_lanes
    args = (lanes.scales, lanes.offsets, lanes.codes)
    with pytest.raises(RuntimeError, match="rows"):
        op(torch.randn(cpu_kernels.LANES_MAX_ROWS + 1, 64), *args, None, 40)
    with pytest.raises(RuntimeError, match="scales"):
        op(torch.randn(2, 96), *args, None, 40)
    with pytest.raises(RuntimeError, match="tiles"):
        op(torch.randn(2, 64), *args, None, 49)  # 3 tiles hold 33..48 rows
    with pytest.raises(RuntimeError, match="offsets"):
        op(torch.randn(2, 64), lanes.scales, lanes.offsets[:0], lanes.codes, None, 40)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.randn(2, 64), *args, torch.randn(48), 40)
    with pytest.raises(RuntimeError, match="codes"):
        op(torch.randn(2, 64), *args[:2], lanes.codes.flatten(-2), None, 40)
