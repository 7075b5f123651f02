"""Our CPU kernels (`csrc/*.cpp`), built on first use: a float32 GEMV, decode and prefill
attention over the paged cache, and the fused glue between the matmuls (RMSNorm,
add + RMSNorm, RoPE, SiLU-mul).

Why the GEMV: a decode step multiplies 1..8 rows by every weight, so on CPU it is bound by
how fast the weights stream from DRAM. torch's CPU matmuls (MKL's sgemv, oneDNN's packed
matmul) do not keep both cores streaming: on the 2-core AMD EPYC CI host (AVX2) they read
SmolLM2-135M's 121 weights of one step (538 MB) at ~12 GB/s at 1 row and 2 threads, a plain
reduction over the same bytes at ~24 GB/s (docs/benchmarks.md, "CPU decode kernels"). This
kernel tiles output rows over torch's own OpenMP threads and streams each weight once.
`dense()` calls, as `routing()` says for this host, `gemv` for float32 products of a few
rows, `gemv_codes` for products of a few rows by a weight that is exactly a GGUF's 4- or
8-bit block codes (`engine.layers.weight_codes`: 4-6x fewer bytes a step, the same weights),
and `gemm_codes` for more rows by such a weight (a prefill, or a step that mixes one in),
where FMAs bound the product and the codes are rebuilt once per call into a cached block:
on an AVX2 host as fast as oneDNN there, without oneDNN's packed float32 copy of every
weight. On an AVX-512 host oneDNN takes all but the GEMV over codes (`Routing`), and the
products over codes run with 16-float vectors (`avx512_codes`), decode rows over a copy of
the codes packed 16 output rows a vector (`gemv_lanes`).

Why the decode attention: the torch backend gathers every decoding sequence's blocks into a
padded copy of K and of V each layer before SDPA; the kernel reads them in place through
the block table (`engine.attention.torch_backend` calls it).

Why the prefill attention (AVX-512 hosts): torch's CPU SDPA flash kernel runs ~50-70
GFLOPS on 64-wide heads there; ours, blocked like flash attention with the query heads of a
kv head stacked, ~180 (docs/benchmarks.md, "Our prefill attention on CPU").

Why the glue: in plain torch an RMSNorm is ~6 ops and a RoPE ~8, each a dispatch and a
pass over a few KB; at batch 1 the ~30 small ops of each of 30 layers cost ~10-20 ms of a
~50 ms step. One op each (`engine.models.fused_llama`'s CPU path) cuts that to ~10 a layer.

Results differ from torch's in the order of sums only (~1e-6 relative); elementwise
arithmetic follows the torch reference op by op (no FMA contraction).

They run on an x86 host with AVX2 and FMA once `load()` succeeded; anything else, or
`PDSERVE_CPU_KERNELS=0`, keeps torch's ops (oneDNN for the matmuls).

Build: one `g++` call against the installed torch's headers and libraries, into
`$PDSERVE_CACHE_DIR` (default `~/.cache/pdserve`) under a name keyed by the sources, the
flags and the torch version, so a changed source or torch builds anew and never loads a
stale library. ~20 s once per machine (`scripts/setup.sh` does it at setup); concurrent
processes wait on a file lock, which the OS releases if the builder dies. A host with no
compiler logs one warning and keeps torch's ops.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pdserve.engine.layers.weight_codes import LaneCodes, WeightCodes, cache_root

log = logging.getLogger("pdserve.engine")

MAX_ROWS = 8  # what `gemv` is built for: past 8 rows loads and FMAs bound the product
CODES_MAX_ROWS = 16  # what `gemv_codes` is built for; `gemm_codes` takes any number
LANES_MAX_ROWS = 64  # what `gemv_lanes` is built for


@dataclass(frozen=True)
class Routing:
    """Which CPU products `linear.dense` gives our kernels; oneDNN takes the rest.

    Our float32 GEMV is AVX2 (8 floats a vector); the products over codes have AVX-512
    twins (`csrc/codes_avx512.cpp`) that run where the host has it. Where torch's own kernels
    use AVX-512 (`torch.backends.cpu.get_cpu_capability()`), oneDNN's float32 matmuls do
    twice the work an instruction, and on a host with full-width AVX-512 units (the 2-core
    AMD EPYC of 2026-12-04) they beat our float32 GEMV at every row count and our GEMM over
    codes at every prefill size (0.7-0.9x); our GEMV over codes reads 4-6x fewer bytes and
    leads up to 12 rows (~2x at 1 row, one thread; docs/benchmarks.md, "CPU kernels on an
    AVX-512 host"). Its lanes-layout twin (`csrc/codes_lanes_avx512.cpp`) is 1.2-1.5x faster
    again and leads oneDNN up to ~48 rows (docs/benchmarks.md, "The lanes GEMV"), so on
    AVX-512 hosts it takes every product by codes of up to 48 rows.
    """

    gemv_rows: int  # float32 products of 1..gemv_rows rows: our GEMV (0: never)
    codes_rows: int  # products by block codes of 1..codes_rows rows: our GEMV over codes
    gemm_codes: bool  # products by block codes of more rows: our GEMM over codes
    # Products by block codes of 1..lanes_rows rows, where the AVX-512 path is on: our GEMV
    # over the codes packed 16 output rows a vector (`gemv_lanes`); it goes first.
    lanes_rows: int = 0


AVX2_ROUTING = Routing(gemv_rows=MAX_ROWS, codes_rows=CODES_MAX_ROWS, gemm_codes=True)
AVX512_ROUTING = Routing(gemv_rows=0, codes_rows=12, gemm_codes=False, lanes_rows=48)
_SOURCES = [Path(__file__).with_name("csrc") / f for f in (
    "cpu_gemv.cpp", "cpu_gemv_codes.cpp", "cpu_gemm_codes.cpp", "cpu_fused.cpp",
    "cpu_attention.cpp", "codes_avx512.cpp", "codes_lanes_avx512.cpp",
    "attention_avx512.cpp")]
_HEADERS = [Path(__file__).with_name("csrc") / h  # part of the build's key
            for h in ("avx2.h", "codes.h", "codes_avx512.h", "codes_operands.h",
                    "attention_avx512.h")]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared",
          "-fPIC"]
_state: bool | None = None  # None: not tried in this process
_codes_on = True
_routing: Routing | None = None  # None: chosen by the host at first use
_prefill_attention_on = True
_avx512: bool | None = None  # the library's AVX-512 switch, once asked (`avx512_codes`)
_lock = threading.Lock()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`x @ weight.T + bias` for float32 `x` of at most `MAX_ROWS` rows (any leading dims);
    `load()` must have returned True."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.pdserve.cpu_gemv(rows.contiguous(), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def gemv_codes(x: torch.Tensor, codes: WeightCodes, bias: torch.Tensor | None = None):
    """`gemv` over a weight's block codes (`engine.layers.weight_codes`): the same products,
    summed in another order, streaming a quarter or less of the bytes."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.pdserve.cpu_gemv_codes(rows.contiguous(), codes.scales, codes.offsets,
                                           codes.codes, bias)
    return out.view(*x.shape[:-1], codes.scales.shape[0])


def gemv_lanes(x: torch.Tensor, lanes: LaneCodes, bias: torch.Tensor | None = None):
    """`gemv_codes` over the codes in the lanes layout (`weight_codes.to_lanes`), at most
    `LANES_MAX_ROWS` rows; AVX-512 path only (`avx512_codes()`). Sums grouped per block of
    32 (`d * (x . q) + m * sum(x)`): the same weights, rounding differs by ~1e-6."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.pdserve.cpu_gemv_lanes(rows.contiguous(), lanes.scales, lanes.offsets,
                                           lanes.codes, bias, lanes.n)
    return out.view(*x.shape[:-1], lanes.n)


def gemm_codes(x: torch.Tensor, codes: WeightCodes, bias: torch.Tensor | None = None):
    """`x @ weight.T + bias` for any number of rows over a weight's block codes; each output
    summed in the same order whatever the number of rows."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.pdserve.cpu_gemm_codes(rows.contiguous(), codes.scales, codes.offsets,
                                           codes.codes, bias)
    return out.view(*x.shape[:-1], codes.scales.shape[0])


def avx512_codes(on: bool | None = None) -> bool:
    """Whether the products over codes run their AVX-512 twins (where the host has it:
    the default); `on` turns them on or off first (A/B runs, tests). `load()` must have
    returned True. Kept here after the first ask: `dense` asks on every product."""
    global _avx512
    if on is not None or _avx512 is None:
        _avx512 = bool(torch.ops.pdserve.cpu_codes_avx512(-1 if on is None else int(on)))
    return _avx512


def set_codes_enabled(enabled: bool) -> None:
    """Let decode products read weights' block codes where found (the default), or not."""
    global _codes_on
    _codes_on = enabled


def routing() -> Routing:
    """This process's routing: the host's (`host_routing`) unless `set_routing` chose."""
    global _routing
    if _routing is None:
        _routing = host_routing()
    return _routing


def host_routing() -> Routing:
    """AVX-512 hosts leave most products to oneDNN (see `Routing`); AVX2 hosts do not."""
    wide = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return AVX512_ROUTING if wide else AVX2_ROUTING


def set_routing(chosen: Routing | None) -> None:
    """Route products by `chosen` in this process (A/B runs, tests); None: the host's."""
    global _routing
    if chosen is not None and not (0 <= chosen.gemv_rows <= MAX_ROWS
                                   and 0 <= chosen.codes_rows <= CODES_MAX_ROWS
                                   and 0 <= chosen.lanes_rows <= LANES_MAX_ROWS):
        raise ValueError(f"rows past what the kernels take: {chosen}")
    _routing = chosen


def set_gemm_codes_enabled(enabled: bool) -> None:
    """Let products past the codes GEMV's rows read the codes too, or send them to oneDNN
    over float32 (for A/B runs); the rest of the routing is kept."""
    set_routing(replace(routing(), gemm_codes=enabled))


def codes_enabled() -> bool:
    return _codes_on and os.environ.get("PDSERVE_WEIGHT_CODES", "1") != "0"


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           max_rows: int | None = MAX_ROWS) -> bool:
    """Whether `gemv` takes this product of at most `max_rows` rows (checks shapes and
    dtypes, then loads once); `gemv_codes` with `CODES_MAX_ROWS`, `gemm_codes` with no
    limit (None)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() == 0:
        return False
    if weight.dim() != 2 or not weight.is_contiguous() or x.shape[-1] != weight.shape[1]:
        return False
    rows = x.numel() // max(1, x.shape[-1])
    if rows < 1 or (max_rows is not None and rows > max_rows) or x.shape[-1] == 0:
        return False
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return False
    if x.requires_grad or weight.requires_grad:
        return False
    return load()


def host_supported() -> bool:
    """x86-64 with AVX2 and FMA (torch's own AVX2 kernels need both)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def load() -> bool:
    """Build if needed and load the kernels; False (once logged) where they cannot run."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _try_load()
    return _state


def set_enabled(enabled: bool) -> bool:
    """Turn the kernels on (loading them) or off in this process, for A/B runs; returns
    whether they now run. Models already switched to the fused CPU path keep it."""
    global _state
    with _lock:
        _state = None if enabled else False
    return load()


def library_path() -> Path:
    """Where this source, these flags and this torch build their library."""
    key = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        key.update(source.read_bytes())
    key.update(" ".join(_FLAGS).encode())
    key.update(torch.__version__.encode())
    key.update(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    return cache_root() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _try_load() -> bool:
    if os.environ.get("PDSERVE_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels off (PDSERVE_CPU_KERNELS=0): torch's ops and oneDNN run")
        return False
    if not host_supported():
        log.info("CPU kernels need x86-64 with AVX2: torch's ops and oneDNN run")
        return False
    try:
        so = library_path()
        if not so.exists():
            _build(so)
        torch.ops.load_library(str(so))
        return True
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable, torch's ops and oneDNN run: %s", e)
        return False


def _build(so: Path) -> None:
    so.parent.mkdir(parents=True, exist_ok=True)
    with open(so.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel drops it if the holder dies
        if so.exists():  # another process built it while this one waited
            return
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++) found")
        from torch.utils import cpp_extension

        lib_dirs = cpp_extension.library_paths()
        cmd = [cxx, *_FLAGS,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{d}" for d in cpp_extension.include_paths()),
               *(str(source) for source in _SOURCES),
               *(f"-L{d}" for d in lib_dirs), *(f"-Wl,-rpath,{d}" for d in lib_dirs),
               "-lc10", "-ltorch_cpu"]
        log.info("building the CPU kernels once (~20 s) into %s", so.parent)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            out = Path(tmp) / so.name
            done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True,
                                  timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
            os.replace(out, so)  # whole or absent: a reader never sees a partial file
        log.info("built the CPU kernels in %.1f s", time.monotonic() - start)


# The fused glue (`csrc/cpu_fused.cpp`); float32 CPU tensors, `load()` returned True.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.pdserve.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual` and `rms_norm(s)`; returns (s, normed)."""
    return torch.ops.pdserve.add_rms_norm(x, residual, weight, eps)


def rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> None:
    torch.ops.pdserve.rope_(positions, q, k, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.pdserve.silu_mul(x)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence `q` `[B, H, D]` over its cached tokens
    `[0, seq_lens[b])`, read in place from the `[blocks, block_size, kvh, D]` caches through
    int32 `block_tables` `[B, W]`; returns `[B, H, D]`. `D % 8 == 0`, float32."""
    return torch.ops.pdserve.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                    seq_lens, scale)


def prefill_attention_on() -> bool:
    """Whether the torch backend gives prefill chunks to `prefill_attention`: the kernels
    loaded, the host has AVX-512 (and the library's AVX-512 switch, `avx512_codes`, is on),
    and `set_prefill_attention_enabled` has not turned it off."""
    return _prefill_attention_on and load() and avx512_codes()


def set_prefill_attention_enabled(enabled: bool) -> None:
    """Give prefill chunks to our kernel where it runs (the default), or to torch's (A/B)."""
    global _prefill_attention_on
    _prefill_attention_on = enabled


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_ids: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
    """Causal attention of a prefill chunk `q` `[L, H, D]`, the last `L` of `seq_len` tokens
    cached in the `[blocks, block_size, kvh, D]` caches' blocks `block_ids` (int32, in
    order); returns `[L, H, D]`. AVX-512 hosts only (`avx512_codes()`), float32,
    `D % 16 == 0`, `D <= 256`."""
    return torch.ops.pdserve.prefill_attention(q, k_cache, v_cache, block_ids, seq_len, scale)
