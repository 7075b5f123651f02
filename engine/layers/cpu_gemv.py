"""Our fp32 GEMV for CPU decode steps (`csrc/cpu_gemv.cpp`), built on first use.

Why: a decode step multiplies 1..8 rows by every weight, so on CPU it is bound by how fast
the weights stream from DRAM. torch's CPU matmuls (MKL's sgemv, oneDNN's packed matmul)
read them at about half the rate the cores can: on the 2-core AMD EPYC CI host (AVX2),
SmolLM2-135M's 121 weights of one step (537 MB) take 47 ms with MKL and 50 ms with oneDNN
at 1 row and 2 threads, where a plain reduction over the same bytes runs at twice the
rate; MKL does not spread a skinny product over the threads, and neither scales with a
second core (docs/benchmarks.md, "CPU GEMV"). This kernel tiles output rows over torch's
own OpenMP threads and streams each weight once.

When: `dense()` calls `gemv` for float32 products of at most `MAX_ROWS` rows on an x86
host with AVX2 and FMA, once `load()` succeeded; anything else, or `PDSERVE_CPU_GEMV=0`,
keeps oneDNN. Results differ from MKL's and oneDNN's in the order of the sums only
(~1e-6 relative), as theirs already differ from each other.

Build: one `g++` call against the installed torch's headers and libraries, into
`$PDSERVE_CACHE_DIR` (default `~/.cache/pdserve`) under a name keyed by the source, the
flags and the torch version, so a changed source or torch builds anew and never loads a
stale library. ~20 s once per machine (`scripts/setup.sh` does it at setup); concurrent
processes wait on a file lock, which the kernel releases if the builder dies. A host with
no compiler logs one warning and keeps oneDNN.
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
from pathlib import Path

import torch

log = logging.getLogger("pdserve.engine")

MAX_ROWS = 8  # more rows than this read the weight again per 8 (oneDNN is faster there)
_SOURCE = Path(__file__).with_name("csrc") / "cpu_gemv.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_state: bool | None = None  # None: not tried in this process
_lock = threading.Lock()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`x @ weight.T + bias` for float32 `x` of at most `MAX_ROWS` rows (any leading dims);
    `load()` must have returned True."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.pdserve.cpu_gemv(rows.contiguous(), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `gemv` takes this product (checks shapes and dtypes, then loads once)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() == 0:
        return False
    if weight.dim() != 2 or not weight.is_contiguous() or x.shape[-1] != weight.shape[1]:
        return False
    if not 1 <= x.numel() // max(1, x.shape[-1]) <= MAX_ROWS or x.shape[-1] == 0:
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
    """Build if needed and load the kernel; False (once logged) where it cannot run."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _try_load()
    return _state


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on (loading it) or off in this process, for A/B runs; returns
    whether it now runs."""
    global _state
    with _lock:
        _state = None if enabled else False
    return load()


def library_path() -> Path:
    """Where this source, these flags and this torch build their library."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(_FLAGS).encode())
    key.update(torch.__version__.encode())
    key.update(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    root = Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")
    return root / "kernels" / f"cpu_gemv-{key.hexdigest()[:16]}.so"


def _try_load() -> bool:
    if os.environ.get("PDSERVE_CPU_GEMV", "1") == "0":
        log.info("CPU GEMV kernel off (PDSERVE_CPU_GEMV=0): decode matmuls use oneDNN")
        return False
    if not host_supported():
        return False
    try:
        so = library_path()
        if not so.exists():
            _build(so)
        torch.ops.load_library(str(so))
        return True
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU GEMV kernel unavailable, decode matmuls use oneDNN: %s", e)
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
               str(_SOURCE),
               *(f"-L{d}" for d in lib_dirs), *(f"-Wl,-rpath,{d}" for d in lib_dirs),
               "-lc10", "-ltorch_cpu"]
        log.info("building the CPU GEMV kernel once (~20 s) into %s", so.parent)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            out = Path(tmp) / so.name
            done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True,
                                  timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
            os.replace(out, so)  # whole or absent: a reader never sees a partial file
        log.info("built the CPU GEMV kernel in %.1f s", time.monotonic() - start)
