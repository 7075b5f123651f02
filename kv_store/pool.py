"""A node's CPU block pool: a preallocated file in shared memory that every worker on the
node maps, so a block is written and read with one memcpy and no RPC.

File layout: a 128-byte file header (magic, slot count, block shape), one 32-byte header
per slot, then the slots, each one KV block in the engine's layout over all layers
(`kv[:, :, block]` of engine/kv_cache/layout.py: `[L, 2, block_size, kv_heads, head_dim]`).

A slot header says what the slot holds: the block hash, the generation the index gave the
write, and optionally a CRC32 of the bytes (flag `_HAS_CRC`). Generations are unique per
write (kv_store/index.py: one counter per pool, restarted above any earlier one) and never
0, so a slot is identified by (slot, generation) without ABA.

The invariant that makes a header check sound (a seqlock, with the generation as its
sequence):

- a writer stores generation 0 before it touches the slot's bytes, then the bytes, then
  hash and CRC, and the new generation last (`write`). A writer that dies anywhere in
  between leaves generation 0 or the old header invalidated: its slot never validates;
- a reader holds a pin on the slot in the index (no new write is handed the slot while it
  is pinned), reads the header before the copy (`check_prefix`: hash and generation as the
  index promised) and again after the copy completed (`recheck_prefix`). When both reads
  find the promised generation the bytes it copied are whole bytes of that write: any
  write that overlapped the copy stored generation 0 before its first byte and another
  generation after its last. The second read only fails when a pin did not hold (its lease ran out
  mid-read, or the index was lost): the reader then treats that block and every block
  after it as a miss.
- the header check trusts the bytes as written; `verify: crc` also recomputes each slot's
  CRC before the read (at memory speed over every byte of the prefix, so it is off by
  default) to catch bytes changed in place by anything that bypasses the protocol.

The ordering relies on stores becoming visible to other processes in program order and
loads not passing loads (x86-64's TSO; numpy stores a field with one aligned store). A
weakly ordered host (Arm) would need fences between the steps, which this module does not
issue.

On a GPU worker the mapping's slots are page-locked for DMA (`pin_for_cuda`, i.e.
cudaHostRegister), so copies between the pool and the GPU run at the host link's pinned
rate and may be asynchronous; the registration is dropped when the mapping goes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pdserve.engine.config import torch_dtype

_MAGIC = b"PDKVPOOL"
_FILE_HEADER = 128
_DTYPE_AT = 96
_SLOT_HEADER = np.dtype([("hash", "S16"), ("gen", "<i8"), ("crc", "<u4"), ("flags", "<u4")])
_HAS_CRC = 1  # flags: the header's CRC covers the slot's bytes
VERIFY_MODES = ("header", "crc")  # what a reader checks before a read (module docstring)
_ALIGN = 4096
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, whatever the device

log = logging.getLogger("pdserve.kv_store")

# zlib.crc32 releases the GIL on large buffers: a prefix's slots are checked in parallel,
# since checking a long prefix one slot at a time (a few GB/s) can cost more than its load.
_CRC_THREADS = min(8, os.cpu_count() or 1)
_crc_pool: ThreadPoolExecutor | None = None
_crc_pool_lock = threading.Lock()


class BlockPool:
    """A mapped pool file. `create` makes one (the store process); `attach` maps an
    existing one (workers). Slot bookkeeping (free, LRU, pins) lives in the index."""

    def __init__(self, path: str, num_slots: int, block_shape: Sequence[int], dtype: str):
        self.path = path
        self.num_slots = num_slots
        self.block_shape = tuple(int(x) for x in block_shape)
        self.dtype = dtype
        tdtype = torch_dtype(dtype)
        self.block_bytes = math.prod(self.block_shape) * torch.empty((), dtype=tdtype
                                                                     ).element_size()
        self._data_offset = _align(_FILE_HEADER + num_slots * _SLOT_HEADER.itemsize)
        size = self._data_offset + num_slots * self.block_bytes
        self._mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
        self.headers = np.ndarray((num_slots,), _SLOT_HEADER, self._mm, _FILE_HEADER)
        self._gens = self.headers["gen"]  # a view: one aligned 8-byte store per write
        raw = np.ndarray((num_slots, self.block_bytes), np.uint8, self._mm, self._data_offset)
        self._raw = raw
        self.blocks = torch.from_numpy(raw).view(tdtype).view(num_slots, *self.block_shape)
        self.pinned = False
        self._unpin: weakref.finalize | None = None

    @classmethod
    def create(cls, path: str, num_slots: int, block_shape: Sequence[int], dtype: str
               ) -> BlockPool:
        if num_slots < 1:
            raise ValueError("a block pool needs at least one slot")
        shape = [int(x) for x in block_shape]
        header = np.zeros(_FILE_HEADER, np.uint8)
        meta = np.array([num_slots, len(shape), *shape], "<i8").tobytes()
        dt = dtype.encode()
        header[:8] = np.frombuffer(_MAGIC, np.uint8)
        header[8:8 + len(meta)] = np.frombuffer(meta, np.uint8)
        header[_DTYPE_AT:_DTYPE_AT + len(dt)] = np.frombuffer(dt, np.uint8)
        probe = cls.__new__(cls)
        probe.block_bytes = math.prod(shape) * torch.empty(
            (), dtype=torch_dtype(dtype)).element_size()
        size = _align(_FILE_HEADER + num_slots * _SLOT_HEADER.itemsize) \
            + num_slots * probe.block_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the memory now: a sparse file in a full tmpfs would SIGBUS a worker on
            # its first write instead of failing here with a clear error.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise OSError(e.errno, f"cannot allocate a {size / 2**20:.0f} MiB KV block "
                              f"pool in {os.path.dirname(path)} ({e.strerror}): lower "
                              "kv_store.pool_mb or enlarge the shared-memory mount") from None
            os.pwrite(fd, header.tobytes(), 0)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(path, num_slots, shape, dtype)

    @classmethod
    def attach(cls, path: str) -> BlockPool:
        with open(path, "rb") as f:
            header = f.read(_FILE_HEADER)
        if header[:8] != _MAGIC:
            raise ValueError(f"{path} is not a KV block pool")
        num_slots, ndim = np.frombuffer(header[8:24], "<i8")
        shape = np.frombuffer(header[24:24 + 8 * int(ndim)], "<i8").tolist()
        dtype = header[_DTYPE_AT:_FILE_HEADER].rstrip(b"\x00").decode()
        return cls(path, int(num_slots), shape, dtype)

    def write(self, slot: int, gen: int, block_hash: bytes, block: torch.Tensor,
              crc: bool = False) -> None:
        """Copy one block (`[L, 2, block_size, kv_heads, head_dim]`, any device) into `slot`
        as generation `gen` of `block_hash`, with a CRC32 of its bytes if `crc`. The caller
        owns the slot (the index allocated it to this write). Order: module docstring."""
        if gen <= 0 or len(block_hash) != 16:
            raise ValueError(f"a slot write needs a positive generation and a 16-byte hash, "
                             f"got {gen} and {len(block_hash)} bytes")
        self._gens[slot] = 0  # readers miss from here until the new header is complete
        self.blocks[slot].copy_(block)  # synchronous, also from a CUDA tensor
        self._publish(slot, gen, block_hash, zlib.crc32(self._raw[slot]) if crc else None)

    def write_bytes(self, slot: int, gen: int, block_hash: bytes, data: bytes,
                    crc: bool = False) -> None:
        """`write` from a block's raw bytes (a pull from another node's pool: one memcpy,
        no tensor); `data` must be exactly `block_bytes` long."""
        if gen <= 0 or len(block_hash) != 16 or len(data) != self.block_bytes:
            raise ValueError(f"a slot write needs a positive generation, a 16-byte hash and "
                             f"{self.block_bytes} bytes, got {gen}, {len(block_hash)} and "
                             f"{len(data)}")
        self._gens[slot] = 0  # readers miss from here until the new header is complete
        self._raw[slot] = np.frombuffer(data, np.uint8)
        self._publish(slot, gen, block_hash, zlib.crc32(self._raw[slot]) if crc else None)

    def _publish(self, slot: int, gen: int, block_hash: bytes, crc: int | None) -> None:
        h = self.headers
        h["hash"][slot] = block_hash
        h["crc"][slot] = crc or 0
        h["flags"][slot] = 0 if crc is None else _HAS_CRC
        self._gens[slot] = gen  # last: the header is whole

    def check(self, slot: int, gen: int, block_hash: bytes, crc: bool = False) -> bool:
        """True if `slot`'s header says generation `gen` of `block_hash` (and, with `crc`,
        its bytes match the header's CRC)."""
        return self.check_prefix([(slot, gen, block_hash)], crc) == 1

    def check_prefix(self, wanted: Sequence[tuple[int, int, bytes]], crc: bool = False) -> int:
        """Before reading `wanted` ((slot, gen, block_hash), in order): how many leading ones
        hold what the index promised. Headers only, unless `crc`: then also the CRCs of
        those slots, in parallel threads (a slot written without a CRC fails)."""
        n = self._headers_match(wanted)
        if not crc or n == 0:
            return n
        slots = [w[0] for w in wanted[:n]]
        flags = self.headers["flags"][slots]
        expected = self.headers["crc"][slots]
        data = [self._raw[s] for s in slots]
        crcs = _crc_executor().map(zlib.crc32, data) if n > 1 else map(zlib.crc32, data)
        for i, got in enumerate(crcs):
            if not flags[i] & _HAS_CRC or got != int(expected[i]):
                return i
        return n

    def recheck_prefix(self, wanted: Sequence[tuple[int, int, bytes]]) -> int:
        """After the copy of `wanted`'s slots completed: how many leading ones still carry
        the header they were checked with (the seqlock's second read); the blocks from the
        first that does not on may be torn and are a miss."""
        return self._headers_match(wanted)

    def _headers_match(self, wanted: Sequence[tuple[int, int, bytes]]) -> int:
        if not wanted:
            return 0
        slots = np.fromiter((w[0] for w in wanted), np.int64, len(wanted))
        inside = (slots >= 0) & (slots < self.num_slots)
        n = len(wanted) if inside.all() else int(np.argmin(inside))
        if n == 0:
            return 0
        gens = self._gens[slots[:n]]  # generation first: a later write zeroes it first
        hashes = self.headers["hash"][slots[:n]]
        ok = (gens == np.fromiter((w[1] for w in wanted[:n]), np.int64, n)) \
            & (hashes == np.array([w[2] for w in wanted[:n]], "S16"))
        return n if ok.all() else int(np.argmin(ok))

    def read_into(self, slot: int, out: torch.Tensor) -> None:
        """Copy `slot` into `out` (a block view of an engine's KV pool)."""
        out.copy_(self.blocks[slot])

    def read_bytes(self, slot: int) -> bytes:
        """A copy of `slot`'s raw bytes (a peer's read: kv_store/peer_service.py); the
        caller holds the slot's pin and rechecks its header after this returned."""
        return self._raw[slot].tobytes()

    def pin_for_cuda(self) -> bool:
        """Page-lock the slots for DMA to and from CUDA devices (idempotent); True if they
        are. A failure (e.g. a mapping the driver cannot lock) leaves the pool pageable:
        copies stay correct, only slower and synchronous. Unpinned by `close` or when this
        object goes; the caller keeps it alive until its asynchronous copies completed."""
        if self.pinned:
            return True
        if not torch.cuda.is_available():
            return False
        ptr, size = self._raw.ctypes.data, self._raw.nbytes
        err = _in_own_thread(lambda: int(torch.cuda.cudart().cudaHostRegister(
            ptr, size, _CUDA_HOST_REGISTER_PORTABLE)))
        if err != 0:
            log.warning("KV store pool %s (%.0f MiB) cannot be pinned for CUDA (cudaError %d): "
                        "loads and saves use pageable copies", self.path, size / 2**20, err)
            return False
        self.pinned = True
        self._unpin = weakref.finalize(self, _cuda_unregister, ptr)
        self._unpin.atexit = False  # process exit drops the registration anyway
        return True

    def close(self) -> None:
        if self._unpin is not None:
            self._unpin()  # before the mapping can go
            self.pinned = False
        self.blocks = self.headers = self._gens = self._raw = None
        self._mm = None  # unmapped once the last view is gone


def _crc_executor() -> ThreadPoolExecutor:
    global _crc_pool
    with _crc_pool_lock:
        if _crc_pool is None:
            _crc_pool = ThreadPoolExecutor(_CRC_THREADS, thread_name_prefix="kv-store-crc")
        return _crc_pool


def _cuda_unregister(ptr: int) -> None:
    err = _in_own_thread(lambda: int(torch.cuda.cudart().cudaHostUnregister(ptr)))
    if err != 0:
        log.warning("cudaHostUnregister of a KV store pool failed (cudaError %d)", err)


def _in_own_thread(call) -> int:
    """Run a CUDA runtime call on a short-lived thread; its cudaError (-1 if it raised). The
    runtime keeps a failed call's error as the calling thread's 'last error', which torch's
    next kernel-launch check on that thread would raise as its own; a thread of its own
    keeps it there."""
    out = [-1]

    def run() -> None:
        try:
            out[0] = call()
        except Exception:  # noqa: BLE001 - reported as a failed registration
            log.exception("CUDA host (un)registration of a KV store pool raised")

    t = threading.Thread(target=run, name="kv-store-cuda-register")
    t.start()
    t.join()
    return out[0]


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
