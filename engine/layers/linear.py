"""Linear layers that know how to take their tensor-parallel shard of a full HF weight.

The model is written once; under TP each rank holds a slice:
- `ColumnParallelLinear` splits output features (no communication);
- `MergedColumnLinear` is several column-parallel outputs fused in one matmul (q|k|v,
  gate|up); each part is split separately so rank r holds q_r|k_r|v_r;
- `RowParallelLinear` splits input features and all-reduces the partial sums;
- `VocabParallelEmbedding` splits the vocabulary; out-of-shard ids give zeros, then
  all-reduce.
Weights are loaded with `load(full_tensor, part=...)`, which narrows to this rank's rows.
Each layer keeps the `ParallelContext` it was built with (`engine.parallel`): which shard
it holds and which group it reduces over. Every projection (and the LM head) multiplies
through `dense`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.layers import cpu_kernels, weight_codes
from pdserve.engine.parallel import SINGLE, ParallelContext

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_onednn_enabled: bool | None = None  # None: not probed yet
# Per dtype, whether this CPU's oneDNN runs it: bf16 needs AVX512-BF16-class instructions
# (avx_ne_convert, or avx512bw+vl+dq) and raises on an AVX2-only host; such a host keeps
# F.linear for bf16.
_onednn_dtype_ok: dict[torch.dtype, bool] = {}

# oneDNN's blocked copy of a CPU weight is made on first use and hangs off the weight
# itself (this attribute), beside the plain values that the embedding, the loaders and TP
# sharding still read; it lives and dies with the weight. `load` calls `forget_packed`.
_PACKED_ATTR = "_pdserve_onednn_packed"
# The row count oneDNN picks its blocked layout for. Measured on the 2-core CI machine
# (SmolLM2-135M's 30 layers of gate|up, 1 thread, ms, plain -> packed for 16 rows):
# 1 row 17.1 -> 15.7, 4 rows 22.8 -> 13.8, 16 rows 35.3 -> 23.6, 64 rows 89 -> 76,
# 512 rows 641 -> 528. A layout packed for 1 row is no faster than plain; at 2 threads,
# layouts for 16, 128 and 512 rows ran alike at 16 and at 512 rows (all four projections:
# 16 rows 41 ms plain -> 24-26 ms, 512 rows 530-630 -> ~500 ms). Decode batches win most.
_PACK_ROWS = 16

# CUDA: the Triton GEMV (`engine.layers.gemv`) for decode steps of <= 8 rows instead of
# cuBLAS, for weights of at most `_gemv_max_weight_bytes` (None: any size; the default
# 64 MiB takes Llama-3.1-8B's q|k|v and o_proj, where cuBLAS reads at 70-82 % of copy
# bandwidth at batch 1, and leaves gate|up, down and the LM head, at 90-98 %, to cuBLAS).
# Decided when a graph is captured: recapture after changing it. Off: measured on an H100
# (docs/benchmarks.md, "Triton GEMV A/B"), it beats cuBLAS on each 1-row projection alone
# (q|k|v 21.4 -> 19.1 us) but not in the CUDA-graph decode step (6.32 -> 6.34-6.48 ms):
# cuBLAS's kernels overlap their launch with the previous kernel's tail and these do not,
# so the gaps between kernels grow by ~300 us a step.
_GEMV_DTYPES = (torch.float16, torch.bfloat16)
_GEMV_MAX_ROWS = 8
_triton_gemv = False
_gemv_max_weight_bytes: int | None = 64 << 20


def set_triton_gemv(enabled: bool, max_weight_bytes: int | None = 64 << 20) -> None:
    """Route CUDA matmuls of <= 8 rows by bf16/fp16 weights of at most `max_weight_bytes`
    (None: any size) through the Triton GEMV instead of cuBLAS."""
    global _triton_gemv, _gemv_max_weight_bytes
    _triton_gemv = enabled
    _gemv_max_weight_bytes = max_weight_bytes


def uses_triton_gemv(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> bool:
    """Whether `dense(x, weight, bias)` runs the Triton GEMV (device aside: CUDA only)."""
    if not _triton_gemv or x.dtype not in _GEMV_DTYPES or weight.dtype != x.dtype:
        return False
    if weight.dim() != 2 or not weight.is_contiguous() or x.dim() == 0:
        return False
    if x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return False
    if not 1 <= x.numel() // x.shape[-1] <= _GEMV_MAX_ROWS:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1):
        return False
    if x.requires_grad or weight.requires_grad:
        return False
    size = weight.numel() * weight.element_size()
    return _gemv_max_weight_bytes is None or size <= _gemv_max_weight_bytes


def set_onednn_linear(enabled: bool) -> None:
    """Route CPU matmuls through oneDNN (the default where torch has it) or `F.linear`."""
    global _onednn_enabled
    _onednn_enabled = enabled and _onednn_available()


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`x @ weight.T + bias`, the one matmul of every projection and of the LM head.

    On CPU a float32 product of a few rows (a decode step) runs our GEMV
    (`engine.layers.cpu_kernels`) where the host can build it; a product by a weight that is
    exactly block codes (`engine.layers.weight_codes`) our GEMV over the codes for a few
    rows, our GEMM over them past that; `cpu_kernels.routing()` says which, by host. Other
    CPU products run oneDNN's
    matmul (`mkldnn._linear_pointwise`, the op torch's own compiler emits for CPU linears)
    instead of `F.linear`'s MKL sgemm. Decode multiplies a few rows by large weights, and
    MKL spreads such skinny products badly over threads: on a 2-core CI machine, one step's
    matmuls of SmolLM2-135M took 52 -> 31 ms at 1 row and 134 -> 69 ms at 16 rows
    (1416 -> 1194 ms at 512). oneDNN and our GEMV sum in other orders, so results match
    MKL's to ~1e-6 relative, not bit for bit — as MKL's own results already differ between
    a row computed alone and the same row inside a batch. On CUDA it runs cuBLAS
    (`F.linear`), or the Triton GEMV when `set_triton_gemv` turned it on.
    """
    if x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and x.dtype == weight.dtype:
        route = cpu_kernels.routing()
        codes = weight_codes.codes_of(weight) if cpu_kernels.codes_enabled() else None
        if codes is not None and cpu_kernels.usable(x, weight, bias, None):
            # The same weight, read as its 4- or 8-bit codes.
            rows = x.numel() // x.shape[-1]
            if rows <= route.lanes_rows and cpu_kernels.avx512_codes():
                return cpu_kernels.gemv_lanes(x, weight_codes.lanes_of(weight), bias)
            if rows <= route.codes_rows:
                return cpu_kernels.gemv_codes(x, codes, bias)
            if route.gemm_codes:
                return cpu_kernels.gemm_codes(x, codes, bias)
        if route.gemv_rows and cpu_kernels.usable(x, weight, bias, route.gemv_rows):
            return cpu_kernels.gemv(x, weight, bias)  # decode rows: the weight at full rate
        # The op has no autograd formula; the engine runs under inference_mode.
        if (_onednn_on() and not (x.requires_grad or weight.requires_grad)
                and _onednn_runs(x.dtype)):
            return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias,
                                                      "none", [None], "")
    elif x.is_cuda and _triton_gemv and uses_triton_gemv(x, weight, bias):
        from pdserve.engine.layers.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn_on() -> bool:
    """Whether CPU products may run oneDNN: probed once, unless `set_onednn_linear` chose."""
    global _onednn_enabled
    if _onednn_enabled is None:
        _onednn_enabled = _onednn_available()
    return _onednn_enabled


def _onednn_runs(dtype: torch.dtype) -> bool:
    ok = _onednn_dtype_ok.get(dtype)
    if ok is None:
        try:
            probe = torch.ones(4, 4, dtype=dtype)
            torch.ops.mkldnn._linear_pointwise(
                probe, torch.ops.mkldnn._reorder_linear_weight(probe, _PACK_ROWS), None,
                "none", [None], "")
            ok = True
        except RuntimeError:
            ok = False
        _onednn_dtype_ok[dtype] = ok
    return ok


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` reordered once into oneDNN's blocked layout (same values, same results as
    the plain layout from 2 rows up; ~1e-6 relative apart at 1 row, like MKL vs oneDNN).
    Reading a blocked weight skips the reorder oneDNN otherwise does inside every call,
    which is what made skinny decode matmuls slow: 30-35 % off a 16-row step's matmuls."""
    packed = getattr(weight, _PACKED_ATTR, None)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)
        setattr(weight, _PACKED_ATTR, packed)
    return packed


def pack_for_prefill(weights: list[torch.Tensor]) -> int:
    """Make now, at load, oneDNN's packed copy of each CPU weight whose prompt-sized products
    `dense` will give oneDNN (all of them on AVX-512 hosts; on AVX2 hosts only those that
    are not block codes). Made on first use instead, the copies of a whole model stall that
    step: a fresh worker's first prompt, or a decode worker's first batch past our GEMV's
    rows, with every request in it (docs/benchmarks.md, "Where a light-load first token
    goes"). Returns how many it packed."""
    if not _onednn_on():
        return 0
    gemm_codes = cpu_kernels.codes_enabled() and cpu_kernels.routing().gemm_codes
    packed = 0
    with torch.inference_mode():
        for w in weights:
            if (w.device.type != "cpu" or w.dtype not in _ONEDNN_DTYPES or w.dim() != 2
                    or not _onednn_runs(w.dtype)):
                continue
            if gemm_codes and weight_codes.codes_of(w) is not None:
                continue  # our GEMM over its codes takes every product past decode rows
            _packed_weight(w)
            packed += 1
    return packed


def forget_packed(weight: torch.Tensor) -> None:
    """Drop the packed copy and the block codes of `weight` (call after changing its values
    in place)."""
    if hasattr(weight, _PACKED_ATTR):
        delattr(weight, _PACKED_ATTR)
    weight_codes.forget(weight)


class MergedColumnLinear(nn.Module):
    """Fused column-parallel projection with named parts of full sizes `part_sizes`.

    `slices[name]` (default: the TP size) cuts a part into fewer slices than ranks, each
    replicated on `tp_size // slices` ranks (`ParallelContext.shard_of`): k and v when TP
    exceeds the KV-head count."""

    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool, dtype,
                 parallel: ParallelContext = SINGLE, slices: dict[str, int] | None = None):
        super().__init__()
        self.parallel = parallel
        size = parallel.tp_size
        self.offsets: dict[str, tuple[int, int]] = {}
        self.slices = {name: min(size, (slices or {}).get(name, size)) for name in part_sizes}
        start = 0
        for name, full in part_sizes.items():
            n = self.slices[name]
            if full % n or (n < size and size % n):
                raise ValueError(f"{name} size {full} cannot be cut into {n} slices over "
                                 f"TP size {size}")
            self.offsets[name] = (start, full // n)
            start += full // n
        self.weight = nn.Parameter(torch.empty(start, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(start, dtype=dtype), requires_grad=False) if bias else None
        )

    def load(self, full: torch.Tensor, part: str, is_bias: bool = False) -> None:
        start, n = self.offsets[part]
        target = self.bias if is_bias else self.weight
        target.data[start : start + n].copy_(self.parallel.shard_of(full, 0, self.slices[part]))
        forget_packed(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)


class ColumnParallelLinear(MergedColumnLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype,
                 parallel: ParallelContext = SINGLE):
        super().__init__(in_features, {"all": out_features}, bias, dtype, parallel)

    def load(self, full: torch.Tensor, part: str = "all", is_bias: bool = False) -> None:
        super().load(full, part, is_bias)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.parallel = parallel
        if in_features % parallel.tp_size:
            raise ValueError(
                f"in_features {in_features} not divisible by TP size {parallel.tp_size}")
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // parallel.tp_size, dtype=dtype),
            requires_grad=False,
        )

    def load(self, full: torch.Tensor) -> None:
        self.weight.data.copy_(self.parallel.shard(full, 1))
        forget_packed(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(dense(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, dtype, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.parallel = parallel
        if vocab_size % parallel.tp_size:
            raise ValueError(f"vocab {vocab_size} not divisible by TP size {parallel.tp_size}")
        self.shard = vocab_size // parallel.tp_size
        self.start = parallel.tp_rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, dim, dtype=dtype), requires_grad=False)

    def load(self, full: torch.Tensor) -> None:
        self.weight.data.copy_(self.parallel.shard(full, 0))
        forget_packed(self.weight)  # the LM head may multiply by this (tied embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight)
        return self.parallel.all_reduce(out * inside.unsqueeze(-1))
