"""The CUDA side of the `nccl` transport: torch streams and events, CuPy NCCL communicators.

The transport logic (nccl_transport / nccl_receiver) talks to the device only through
`CudaDevice` and `NcclComm`, so the protocol can be driven on CPU by a stand-in with the
same methods (tests/unit/test_nccl_transport.py). CuPy is imported here, lazily, on the
first `CudaDevice`: importing kv_transfer never imports it (DESIGN.md: CuPy needs CUDA).

Every buffer made here is allocated while its stream is current, so torch's caching
allocator hands it out again only to later work on that same stream: dropping the Python
reference right after enqueueing the NCCL call that reads or fills it is safe.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kv_transfer.base import KVTransferError


def load_nccl() -> Any:
    """`cupy.cuda.nccl`, or a clear error saying what is missing."""
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise KVTransferError(
            "KV transport 'nccl' needs CuPy built with NCCL (pip install cupy-cuda12x or "
            f"cupy-cuda13x on a CUDA machine): {e}"
        ) from None
    if not getattr(nccl, "available", True):
        raise KVTransferError("KV transport 'nccl': this CuPy build has no NCCL support")
    return nccl


def new_communicator(nccl: Any, uid: Sequence[int], rank: int, nranks: int = 2) -> Any:
    """`NcclCommunicator` from an id held as plain ints (how it crosses Ray and queues)."""
    raw = bytes(int(b) & 0xFF for b in uid)
    try:
        return nccl.NcclCommunicator(nranks, raw, rank)  # CuPy >= 14 takes bytes
    except TypeError:  # older CuPy: a tuple of C chars, signed
        return nccl.NcclCommunicator(nranks, tuple(b - 256 if b > 127 else b for b in raw),
                                     rank)


class NcclComm:
    """One side of a 2-rank communicator; the peer is the other rank.

    Not thread-safe: the owner serializes calls (NCCL forbids concurrent calls on one
    communicator), except `abort`, which NCCL allows from any thread to unblock the rest.
    Buffers are (tensor, byte offset, byte count): a run of blocks inside the KV pool is
    addressed by arithmetic, not by slicing a view per call.
    """

    def __init__(self, nccl: Any, device_index: int, uid: Sequence[int], rank: int) -> None:
        import cupy

        self._nccl = nccl
        self.device_index = device_index
        self.rank = rank
        self.peer = 1 - rank
        # ncclCommInitRank blocks until the peer joins and binds the current device.
        with torch.cuda.device(device_index), cupy.cuda.Device(device_index):
            self._comm = new_communicator(nccl, uid, rank)

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Fuse the sends/recvs issued inside into one launch (ncclGroupStart/End)."""
        with torch.cuda.device(self.device_index):
            self._nccl.groupStart()
            try:
                yield
            finally:
                self._nccl.groupEnd()

    def send(self, t: torch.Tensor, stream: torch.cuda.Stream, offset: int = 0,
             nbytes: int | None = None) -> None:
        """Send `nbytes` of `t` from byte `offset` (all of it by default). Call inside
        `group()`, which sets the device: per-call device switches would cost more than
        the call itself, and a layer makes one call per K or V run."""
        n = t.numel() * t.element_size() - offset if nbytes is None else nbytes
        self._comm.send(t.data_ptr() + offset, n, self._nccl.NCCL_UINT8, self.peer,
                        stream.cuda_stream)

    def recv(self, t: torch.Tensor, stream: torch.cuda.Stream, offset: int = 0,
             nbytes: int | None = None) -> None:
        """Receive into `nbytes` of `t` at byte `offset`; like `send`, inside `group()`."""
        n = t.numel() * t.element_size() - offset if nbytes is None else nbytes
        self._comm.recv(t.data_ptr() + offset, n, self._nccl.NCCL_UINT8, self.peer,
                        stream.cuda_stream)

    def abort(self) -> None:
        """Make every pending operation on this communicator return; it is unusable after."""
        self._comm.abort()


class CudaDevice:
    """Streams, events, small buffers and communicators on the KV pool's CUDA device."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(
                f"KV transport 'nccl' needs the KV pool on a CUDA device, got {device}; "
                "use transport 'grpc' (or 'local') on CPU"
            )
        if not torch.cuda.is_available():
            raise KVTransferError("KV transport 'nccl' needs CUDA, which is not available")
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self._nccl = load_nccl()

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """An event that completes when the work enqueued on `stream` so far has run."""
        with torch.cuda.device(self.index):
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        """Order later work on `stream` after `event` without blocking the host."""
        stream.wait_event(event)

    @contextlib.contextmanager
    def _on(self, stream: torch.cuda.Stream) -> Iterator[None]:
        # Callers are worker, link and finisher threads whose current device may be another
        # GPU: pin memory and allocate in this device's context, on `stream`.
        with torch.cuda.device(self.index), torch.cuda.stream(stream):
            yield

    def upload(self, words: Sequence[int], stream: torch.cuda.Stream) -> torch.Tensor:
        with self._on(stream):
            host = torch.tensor(list(words), dtype=torch.int64).pin_memory()
            return host.to(self.device, non_blocking=True)

    def download(self, t: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        """A host copy of `t`, valid once an event recorded on `stream` after it completed."""
        with self._on(stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
        return host

    def words(self, n: int, stream: torch.cuda.Stream) -> torch.Tensor:
        with self._on(stream):
            return torch.empty(n, dtype=torch.int64, device=self.device)

    def scratch(self, nbytes: int, stream: torch.cuda.Stream) -> torch.Tensor:
        with self._on(stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def gather(self, layers_kv: torch.Tensor, idx: torch.Tensor,
               stream: torch.cuda.Stream) -> torch.Tensor:
        """`layers_kv[:, :, idx]` made contiguous on `stream` (a run whose sources are
        scattered), for a slice of layers at once: `[layers, 2, len(idx), ...]`."""
        with self._on(stream):
            return layers_kv.index_select(2, idx)

    def unique_id(self) -> list[int]:
        # bytes (CuPy >= 14) or a tuple of signed chars (older): 0..255 either way
        return [int(b) & 0xFF for b in self._nccl.get_unique_id()]

    def connect(self, uid: Sequence[int], rank: int) -> NcclComm:
        return NcclComm(self._nccl, self.index, uid, rank)


def poll(done: Callable[[], bool], deadline: float | None = None,
         stop: Callable[[], bool] | None = None, max_sleep: float = 1e-3,
         eager_s: float = 0.25) -> bool:
    """Wait for `done()` without holding a core.

    Checks every ~20 us for the first `eager_s` (a transfer's next message usually comes
    within milliseconds, and its latency is TTFT), then backs off to `max_sleep`. Returns
    True once done; False as soon as `stop()` is true or the wall-clock `deadline`
    (time.time()) passed. Polling, not a blocking event sync, so a dead peer can never
    hold the caller past its deadline.
    """
    start = time.monotonic()
    sleep = 2e-5
    while not done():
        if (stop is not None and stop()) or (deadline is not None and time.time() >= deadline):
            return done()
        time.sleep(sleep)
        if time.monotonic() - start > eager_s:
            sleep = min(sleep * 2, max_sleep)
    return True
