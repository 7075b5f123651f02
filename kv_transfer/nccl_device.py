"""The CUDA side of the `nccl` transport: torch streams and events, CuPy NCCL communicators.

The transport logic (nccl_transport / nccl_receiver) talks to the device only through
`CudaDevice` and `NcclComm`, so the protocol can be driven on CPU by a stand-in with the
same methods (tests/unit/test_nccl_transport.py). CuPy is imported here, lazily, on the
first `CudaDevice`: importing kv_transfer never imports it (DESIGN.md: CuPy needs CUDA).

Every buffer made here is allocated while its stream is current, so torch's caching
allocator hands it out again only to later work on that same stream: dropping the Python
reference right after enqueueing the NCCL call that reads or fills it is safe.

NCCL tuning: NCCL reads its environment once per process, when it makes the first
communicator. `apply_nccl_tuning` sets a validated subset of NCCL's point-to-point knobs
(`NCCL_TUNABLES`) before that; the transport takes them as its `nccl_tuning` option, or from
`PDSERVE_NCCL_TUNING` ("P2P_NVL_CHUNKSIZE=524288,MIN_P2P_NCHANNELS=32", the NCCL_ prefix
optional). Nothing is set by default. Both sides of a pair must agree (NCCL splits a message
over channels by these numbers on each side): the hello carries a digest of them and the
decode side refuses a pair whose digest differs from its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from pdserve.kv_transfer.base import KVTransferError
from pdserve.kv_transfer.nccl_wire import MAX_GROUP_OPS

TUNING_ENV = "PDSERVE_NCCL_TUNING"
# NCCL knobs that shape point-to-point send/recv, with the integer range accepted for each.
# (NCCL 2.28: P2P_NVL_CHUNKSIZE is the step of a send/recv over NVLink, 512 KiB by default;
# MIN/MAX_P2P_NCHANNELS bound the channels (one CTA each) that send/recv may use; a message
# to one peer is split over up to half of them; MIN/MAX_CTAS bound all channels;
# NCHANNELS_PER_NET_PEER only matters across nodes.)
NCCL_TUNABLES: dict[str, tuple[int, int]] = {
    "NCCL_P2P_NVL_CHUNKSIZE": (4096, 1 << 26),
    "NCCL_P2P_PCI_CHUNKSIZE": (4096, 1 << 26),
    "NCCL_P2P_NET_CHUNKSIZE": (4096, 1 << 26),
    "NCCL_MIN_P2P_NCHANNELS": (1, 64),
    "NCCL_MAX_P2P_NCHANNELS": (1, 64),
    "NCCL_MIN_CTAS": (1, 64),
    "NCCL_MAX_CTAS": (1, 64),
    "NCCL_MIN_NCHANNELS": (1, 64),
    "NCCL_MAX_NCHANNELS": (1, 64),
    "NCCL_NCHANNELS_PER_NET_PEER": (1, 64),
    "NCCL_P2P_READ_ENABLE": (0, 1),
    "NCCL_P2P_LL_THRESHOLD": (0, 1 << 24),
    "NCCL_BUFFSIZE": (1 << 16, 1 << 30),
}
_ENV_LOCK = threading.Lock()
_ENV_AT_INIT: dict[str, str] | None = None  # the tunables when this process's first comm was made


def parse_nccl_tuning(spec: str | Mapping[str, Any] | None) -> dict[str, str]:
    """Validate NCCL tuning given as "NAME=INT,..." or a mapping; names may omit `NCCL_`.
    Returns {full NCCL env name: decimal string}; ValueError names what is wrong."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.replace(";", ",").split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"NCCL tuning item {part!r} is not NAME=VALUE")
            items.append((name.strip(), value.strip()))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        raise ValueError(f"NCCL tuning must be a string or a mapping, not {type(spec).__name__}")
    out: dict[str, str] = {}
    for name, value in items:
        key = str(name).upper()
        key = key if key.startswith("NCCL_") else f"NCCL_{key}"
        if key not in NCCL_TUNABLES:
            raise ValueError(f"NCCL tuning {name!r} is not one of "
                             f"{sorted(k.removeprefix('NCCL_') for k in NCCL_TUNABLES)}")
        try:
            if isinstance(value, bool):
                raise TypeError
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"NCCL tuning {key}={value!r} is not an integer") from None
        lo, hi = NCCL_TUNABLES[key]
        if not lo <= n <= hi:
            raise ValueError(f"NCCL tuning {key}={n} is outside {lo}..{hi}")
        out[key] = str(n)
    for lo_key, hi_key in (("NCCL_MIN_P2P_NCHANNELS", "NCCL_MAX_P2P_NCHANNELS"),
                           ("NCCL_MIN_CTAS", "NCCL_MAX_CTAS"),
                           ("NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS")):
        if lo_key in out and hi_key in out and int(out[lo_key]) > int(out[hi_key]):
            raise ValueError(f"NCCL tuning {lo_key}={out[lo_key]} exceeds {hi_key}={out[hi_key]}")
    return out


def _tunables_now() -> dict[str, str]:
    return {k: os.environ[k] for k in sorted(NCCL_TUNABLES) if k in os.environ}


def apply_nccl_tuning(spec: str | Mapping[str, Any] | None) -> dict[str, str]:
    """Set validated NCCL tuning in this process's environment (`None`: use
    `$PDSERVE_NCCL_TUNING`, if set). Must come before the process's first communicator:
    afterwards a value that differs from the one NCCL read raises KVTransferError.
    Returns what was set."""
    if spec is None:
        spec = os.environ.get(TUNING_ENV) or None
    tuning = parse_nccl_tuning(spec)
    with _ENV_LOCK:
        if _ENV_AT_INIT is not None:
            late = {k: v for k, v in tuning.items() if _ENV_AT_INIT.get(k) != v}
            if late:
                raise KVTransferError(
                    f"NCCL tuning {late} asked after this process made its first NCCL "
                    f"communicator (NCCL read {_ENV_AT_INIT or 'no tuning'} then): set it "
                    "before any communicator, e.g. in $" + TUNING_ENV)
        os.environ.update(tuning)
    return tuning


def tuning_digest() -> int:
    """A 63-bit digest of the NCCL tuning this process's communicators were made with."""
    with _ENV_LOCK:
        env = _ENV_AT_INIT if _ENV_AT_INIT is not None else _tunables_now()
    text = ",".join(f"{k}={v}" for k, v in sorted(env.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _mark_comm_made() -> None:
    global _ENV_AT_INIT
    with _ENV_LOCK:
        if _ENV_AT_INIT is None:
            _ENV_AT_INIT = _tunables_now()


def group_sizes(n: int, first: int = MAX_GROUP_OPS) -> list[int]:
    """How `n` calls are split into NCCL groups: `first`, then doubling, at most
    MAX_GROUP_OPS each. A small first group gets its kernel running (and the data moving)
    while the host still posts the rest, instead of after the last call of one big group."""
    sizes, size = [], max(1, min(first, MAX_GROUP_OPS))
    while n > 0:
        sizes.append(min(size, n))
        n -= sizes[-1]
        size = min(2 * size, MAX_GROUP_OPS)
    return sizes


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
    _mark_comm_made()
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

    def send_many(self, ops: Sequence[tuple[torch.Tensor, int, int]],
                  stream: torch.cuda.Stream, first_group: int = MAX_GROUP_OPS) -> None:
        """Send each (tensor, byte offset, bytes) in order, in groups (`group_sizes`)."""
        self._many(self._comm.send, ops, stream, first_group)

    def recv_many(self, ops: Sequence[tuple[torch.Tensor, int, int]],
                  stream: torch.cuda.Stream, first_group: int = MAX_GROUP_OPS) -> None:
        """Receive into each (tensor, byte offset, bytes) in order, grouped like
        `send_many` (the two sides may group differently: calls to one peer run in order)."""
        self._many(self._comm.recv, ops, stream, first_group)

    def _many(self, call: Callable, ops: Sequence, stream: torch.cuda.Stream,
              first_group: int) -> None:
        # The per-call Python path is most of the host cost of posting a layer: keep it bare.
        nccl, u8, peer, s = self._nccl, self._nccl.NCCL_UINT8, self.peer, stream.cuda_stream
        switch = torch.cuda.current_device() != self.device_index
        with torch.cuda.device(self.device_index) if switch else contextlib.nullcontext():
            at = 0
            for size in group_sizes(len(ops), first_group):
                nccl.groupStart()
                try:
                    for t, offset, n in ops[at:at + size]:
                        call(t.data_ptr() + offset, n, u8, peer, s)
                finally:
                    nccl.groupEnd()
                at += size

    def abort(self) -> None:
        """Make every pending operation on this communicator return; it is unusable after."""
        self._comm.abort()


class CudaDevice:
    """Streams, events, small buffers and communicators on the KV pool's CUDA device."""

    def __init__(self, device: torch.device,
                 nccl_tuning: str | Mapping[str, Any] | None = None) -> None:
        if device.type != "cuda":
            raise ValueError(
                f"KV transport 'nccl' needs the KV pool on a CUDA device, got {device}; "
                "use transport 'grpc' (or 'local') on CPU"
            )
        if not torch.cuda.is_available():
            raise KVTransferError("KV transport 'nccl' needs CUDA, which is not available")
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.tuning = apply_nccl_tuning(nccl_tuning)  # before NCCL reads its environment
        self._nccl = load_nccl()

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """An event that completes when the work enqueued on `stream` so far has run.
        (torch creates and records an event on its stream's device: no device switch.)"""
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def timer(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """Like `record`, with timing on (for `elapsed`)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    @staticmethod
    def elapsed(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        """Seconds between two completed `timer` events."""
        return start.elapsed_time(end) / 1e3

    @staticmethod
    def tuning_digest() -> int:
        return tuning_digest()

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


_SLACK = threading.local()


def _fine_timer_slack() -> None:
    """Linux rounds a sleeping thread's wake-up up by its timer slack (50 us by default),
    which would turn `poll`'s 20 us sleeps into ~70 us: make it 1 us for the calling thread
    (PR_SET_TIMERSLACK; per thread, once; a no-op elsewhere)."""
    if getattr(_SLACK, "done", False):
        return
    _SLACK.done = True
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, ns
    except (OSError, AttributeError):
        pass


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
    if done():
        return True
    _fine_timer_slack()
    start = time.monotonic()
    sleep = 2e-5
    while not done():
        if (stop is not None and stop()) or (deadline is not None and time.time() >= deadline):
            return done()
        time.sleep(sleep)
        if time.monotonic() - start > eager_s:
            sleep = min(sleep * 2, max_sleep)
    return True
