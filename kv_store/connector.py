"""The global KV store as a KV connector (engine/kv_connector.py), for any worker on a node
whose store process runs (kv_store/node_store.py).

Get: when the scheduler admits a request, `num_external_tokens` pins the longest prefix of
the request's block hashes (after what the engine's own prefix cache holds) that the node's
pool has, and checks each slot's header against the hash and generation the index gave
(with `verify="crc"` also its bytes against their CRC); the first mismatch ends the prefix
(a miss, never wrong KV). The worker half copies those slots into the request's fresh
blocks at the start of the admitting step, before any layer reads them, then reads their
headers again (kv_store/pool.py: a seqlock over the pin) and unpins them. On a CUDA engine
the pool is pinned at start-up (kv_store/pool_attach.py) and each request's load is one
asynchronous batch on a copy stream (kv_store/cuda_copy.py) that the first layer waits
for; its headers are read again once it completed, at the end of the step.

A header that changed during the copy means a pin did not hold (its lease ran out): the
step's outputs are not used — `StoreReadError` is raised from `wait_for_layer` (CPU: the
copy was checked before the forward pass) or `end_step` (CUDA), which fails the step (the
engine loop aborts its batch) — except in `load_now`, whose result just ends before it.

Put: when a request leaves the engine, its full computed blocks (prompt and output; the
block hashes the scheduler committed, so they carry the content key) are saved to the pool
on a background thread. `request_finished` keeps the blocks until that thread copied them;
an abort stops the copy between two blocks. Blocks a worker later evicts from its own pool
were saved this way when their request ended, so eviction needs no second copy.

Pull: with the cluster's store secret (`peer_secret`), `pull_from_peers` copies a prefix
that another node's pool holds and this node's lacks into this node's pool over gRPC
(kv_store/peer_service.py), on the caller's thread — the worker actor's, before it hands
the request to the engine — so that the local load above then serves it.

No Redis, or no store process on the node: lookups are misses and saves are skipped; the
engine serves on, computing everything itself.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.kv_cache.block_hash import hash_blocks
from pdserve.engine.kv_connector import (
    KVConnector,
    LoadSpec,
    StepTransfers,
)
from pdserve.engine.sequence import FinishReason
from pdserve.engine.sequence import Sequence as Seq
from pdserve.kv_store.index import SlotRef, StoreIndex
from pdserve.kv_store.pool import VERIFY_MODES, BlockPool
from pdserve.kv_store.pool_attach import PoolAttachment

if TYPE_CHECKING:
    import torch

    from pdserve.engine.scheduler import ScheduledSeq
    from pdserve.kv_store.cuda_copy import CudaBlockCopier, PendingLoad
    from pdserve.kv_store.peer_service import PeerPuller
    from pdserve.tls import TLSFiles

log = logging.getLogger("pdserve.kv_store")


@dataclass(slots=True)
class StoreCounters:
    """What this worker got from and gave to the store (WorkerStats' store_* fields)."""

    lookups: int = 0  # admissions that asked the store
    hit_blocks: int = 0  # blocks loaded from the store
    hit_tokens: int = 0
    rejected_blocks: int = 0  # indexed but whose header (or CRC) did not check out (a miss)
    torn_blocks: int = 0  # whose header changed during the copy (a pin that did not hold)
    saved_blocks: int = 0  # blocks this worker wrote to the pool
    save_skipped: int = 0  # saves dropped: no store, no Redis, or no free slot
    lookup_s: float = 0.0  # in lookups: hashing, the index round trip, the slot checks
    verify_s: float = 0.0  # of lookup_s: the slot checks (headers; CRCs with verify "crc")
    loaded_bytes: int = 0
    load_s: float = 0.0  # copying loads into the KV pool (device time on CUDA)


class StoreReadError(RuntimeError):
    """A stored block's header changed while it was copied: the step must not use it."""


@dataclass(slots=True)
class _Load:
    """One request's load: the slots it reads (pinned) in `pool`, and on CUDA the batch in
    flight on the copy stream."""

    pool: BlockPool
    refs: list[SlotRef]
    pending: PendingLoad | None = None


@dataclass(slots=True)
class _Save:
    request_id: str
    block_ids: list[int]
    hashes: list[bytes]
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class StoreConnector(KVConnector):
    """Loads prefixes from and saves finished requests' blocks to this node's pool.

    `verify`: what a load checks before it reads a slot ("header": hash and generation;
    "crc": also the CRC of its bytes, which saves then compute). `on_saved` is called (from
    the saver thread) when a kept request's blocks may be freed: the owner wakes its engine
    loop then (it may be set after construction)."""

    def __init__(self, index: StoreIndex, node: str, on_saved: Callable[[], None] = lambda: None,
                 pin_lease_s: float = 30.0, verify: str = "header", peer_secret: str = "",
                 peer_tls: TLSFiles | None = None, pull_timeout_s: float = 5.0):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.index = index
        self.node = node
        self.pin_lease_ms = int(pin_lease_s * 1000)
        self.verify = verify
        self.on_saved = on_saved
        self.counters = StoreCounters()
        self.kv_cache: torch.Tensor | None = None
        self.compat_key = ""
        self.block_size = 0
        self._pools: PoolAttachment | None = None  # made by register_kv_cache
        self._peer = (peer_secret, peer_tls, pull_timeout_s)
        self.puller: PeerPuller | None = None  # with a peer secret, made by register_kv_cache
        # Engine thread only: each admitted request's pinned slots, with the pool mapping
        # they were checked in (the saver thread may map a newer pool meanwhile).
        self._pins: dict[str, tuple[BlockPool, list[SlotRef]]] = {}
        self._copier: CudaBlockCopier | None = None  # a CUDA engine's
        # Engine thread only: this step's loads, copied (CPU) or in flight on the copy
        # stream (CUDA), their slots pinned until `_finish_loads` rechecked them.
        self._loads: list[_Load] = []
        self._torn: str | None = None  # a recheck that failed, raised by the worker half
        self._waited = False
        self._saves: dict[str, _Save] = {}
        self._finished: list[str] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Save | None] = queue.SimpleQueue()
        self._saver = threading.Thread(target=self._save_loop, name="kv-store-save",
                                       daemon=True)
        self._saver.start()

    @property
    def pool_pinned(self) -> bool:
        """Whether the node's pool, as this worker maps it, is page-locked for CUDA."""
        return self._pools is not None and self._pools.pinned

    def attach_pool(self) -> bool:
        """Map (on CUDA: and pin) the node's registered pool now, on the calling thread;
        False if there is none. A CUDA worker does this by itself from start-up on."""
        return self._pools is not None and self._pools.attach_registered() is not None

    def pull_from_peers(self, token_ids: Sequence[int]) -> int:
        """Copy the prompt's prefix that another node's pool holds beyond this node's into
        this node's pool (blocks written; 0 without peers, on a miss or on any failure).
        Blocking for up to the pull timeout: call it off the engine thread."""
        if self.puller is None:
            return 0
        return self.puller.pull(self._prefix_hashes(token_ids))

    def close(self) -> None:
        self._queue.put(None)
        self._saver.join(5)
        if self.puller is not None:
            self.puller.close()
        if self._pools is not None:
            self._pools.close()
        self.index.close()

    # ---- scheduler half -----------------------------------------------------------------------

    def num_external_tokens(self, seq: Seq, num_local_tokens: int) -> int:
        self._unpin(seq.request_id)  # a request re-admitted after its earlier try failed
        bs = self.block_size
        if num_local_tokens % bs:
            return 0
        t0 = time.perf_counter()
        hashes = self._prefix_hashes(seq.token_ids)[num_local_tokens // bs:]
        pool, refs = self._pin_checked(hashes)
        self.counters.lookup_s += time.perf_counter() - t0
        if refs:
            self._pins[seq.request_id] = (pool, refs)
        return len(refs) * bs

    def load_now(self, token_ids: Sequence[int], first_block: int,
                 block_ids: Sequence[int]) -> list[bytes]:
        """Copy the stored blocks of the prompt's prefix from block `first_block` on into
        `block_ids` (fresh blocks of a reservation, in order) right now, on the engine
        thread; returns the hashes of the blocks written (a prefix of them, maybe none).
        Never the last token's block, whose KV the prefill side must send."""
        t0 = time.perf_counter()
        hashes = self._prefix_hashes(token_ids)[first_block:first_block + len(block_ids)]
        pool, refs = self._pin_checked(hashes)
        self.counters.lookup_s += time.perf_counter() - t0
        if not refs:
            return []
        try:
            self._load(pool, refs, block_ids[:len(refs)])
        finally:
            good = self._finish_loads(fail_step=False)  # between steps: only this load
        return [r.block_hash for r in refs[:good[0]]]

    def build_step(self, batch: Sequence[ScheduledSeq], load: Sequence[LoadSpec]
                   ) -> StepTransfers:
        return StepTransfers(load=tuple(load))

    def request_finished(self, seq: Seq) -> bool:
        rid = seq.request_id
        self._unpin(rid)
        if seq.finish_reason is FinishReason.ABORT:
            with self._lock:
                save = self._saves.pop(rid, None)
            if save is not None:
                with save.lock:  # waits for the block being copied, then stops the copy
                    save.cancelled = True
            return True
        n = min(len(seq.block_hashes), len(seq.block_ids))
        if n == 0:
            return True
        if not self.index.available:
            self.counters.save_skipped += n
            return True
        save = _Save(rid, list(seq.block_ids[:n]), list(seq.block_hashes[:n]))
        with self._lock:
            self._saves[rid] = save
        self._queue.put(save)
        return False

    # ---- worker half --------------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        self.kv_cache = kv_cache
        self.compat_key = compat_key
        self.block_size = kv_cache.shape[3]
        cuda = kv_cache.device.type == "cuda"
        self._pools = PoolAttachment(self.index, self.node, tuple(kv_cache[:, :, 0].shape),
                                     kv_cache.dtype, pin=cuda)
        secret, tls, timeout_s = self._peer
        if secret:
            from pdserve.kv_store.peer_service import PeerPuller

            self.puller = PeerPuller(self.index, self.node, self._pools, secret, tls=tls,
                                     timeout_s=timeout_s, crc=self.verify == "crc")
        if cuda:
            from pdserve.kv_store.cuda_copy import CudaBlockCopier

            self._copier = CudaBlockCopier(kv_cache)
            self._pools.watch()  # pins the node's pool as soon as its store registers it

    def start_step(self, transfers: StepTransfers) -> None:
        # The loads start now, before the forward pass: every layer needs them before its
        # attention. On CPU they are copied and rechecked here; on CUDA they are queued on
        # the copy stream and rechecked in `end_step`.
        self._waited = False
        try:
            for spec in transfers.load:
                pool, refs = self._pins.pop(spec.request_id, (None, []))
                first = spec.first_token // self.block_size
                n = spec.num_tokens // self.block_size
                if len(refs) < n:
                    self.index.unpin(self.node, refs)
                    raise RuntimeError(f"{spec.request_id}: {n} store blocks admitted, "
                                       f"{len(refs)} pinned")
                self.index.unpin(self.node, refs[n:])
                self._load(pool, refs[:n], spec.block_ids[first:first + n])
        except BaseException:
            self._finish_loads()  # what was queued completes before the blocks can go
            self._torn = None  # the step fails anyway
            raise
        if self._copier is None:
            self._finish_loads()  # a torn copy raises in wait_for_layer, inside the step

    def wait_for_layer(self, layer: int) -> None:
        self._raise_torn()
        if not self._waited and self._loads and self._copier is not None:
            for load in self._loads:  # queued on the device: the host goes on
                self._copier.wait_loaded(load.pending)
            self._waited = True

    def save_layer(self, layer: int) -> None:
        pass

    def end_step(self) -> None:
        self._finish_loads()
        self._raise_torn()

    def finished_transfers(self) -> list[str]:
        with self._lock:
            out, self._finished = self._finished, []
        return out

    # ---- internals ----------------------------------------------------------------------------

    def _load(self, pool: BlockPool, refs: list[SlotRef], block_ids: Sequence[int]) -> None:
        """Copy the pinned `refs` of `pool` into `block_ids` (on CUDA: start to); they stay
        pinned until `_finish_loads`."""
        n = len(refs)
        if n == 0:
            return
        if self._copier is not None:
            try:
                pending = self._copier.load(pool, [r.slot for r in refs], block_ids)
            except BaseException:
                self._copier.load_stream.synchronize()  # copies queued before the failure
                self.index.unpin(self.node, refs)
                raise
            self._loads.append(_Load(pool, refs, pending))
        else:
            self._loads.append(_Load(pool, refs))  # unpinned by _finish_loads, also on error
            t0 = time.perf_counter()
            for ref, block in zip(refs, block_ids):
                pool.read_into(ref.slot, self.kv_cache[:, :, block])
            self.counters.load_s += time.perf_counter() - t0
            self.counters.loaded_bytes += n * pool.block_bytes
        self.counters.hit_blocks += n
        self.counters.hit_tokens += n * self.block_size

    def _finish_loads(self, fail_step: bool = True) -> list[int]:
        """Wait for this step's loads (also after a failed step: a load queued before the
        failure still reads its slots), read their headers again and unpin them. Returns how
        many leading blocks of each are whole; with `fail_step`, a load with fewer makes
        the worker half raise `StoreReadError` in the step."""
        loads, self._loads = self._loads, []
        good = []
        try:
            for load in loads:
                if load.pending is not None:
                    self.counters.load_s += load.pending.wait() / 1e3
                    self.counters.loaded_bytes += load.pending.nbytes
                n = load.pool.recheck_prefix([(r.slot, r.gen, r.block_hash) for r in load.refs])
                good.append(n)
                if n < len(load.refs):
                    self.counters.torn_blocks += len(load.refs) - n
                    msg = (f"{len(load.refs) - n} of {len(load.refs)} KV store blocks were "
                           "rewritten while they were loaded (a read pin did not hold)")
                    log.error("%s: %s", msg, "the step's output is dropped" if fail_step
                              else "they are a miss")
                    if fail_step:
                        self._torn = msg
        finally:
            for load in loads:
                self.index.unpin(self.node, load.refs)
        return good

    def _raise_torn(self) -> None:
        if self._torn is not None:
            msg, self._torn = self._torn, None
            raise StoreReadError(msg)

    def _prefix_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Hashes of the full blocks a load may cover: never the last token's block."""
        usable = (len(token_ids) - 1) // self.block_size * self.block_size
        return hash_blocks(list(token_ids[:usable]), self.block_size, self.compat_key)

    def _pin_checked(self, hashes: Sequence[bytes]) -> tuple[BlockPool | None, list[SlotRef]]:
        """Pin the longest stored prefix of `hashes` whose slots check out (the rest, if
        any, is unpinned again): one round trip, then the checks `verify` names."""
        if not hashes or not self.index.available or self._pools is None:
            return None, []
        self.counters.lookups += 1
        found = self.index.pin(self.node, hashes, self.pin_lease_ms)
        if found is None:
            return None, []
        path, refs = found
        pool = self._pools.current(path)
        good = 0
        if pool is not None:
            t0 = time.perf_counter()
            good = pool.check_prefix([(r.slot, r.gen, r.block_hash) for r in refs],
                                     crc=self.verify == "crc")
            self.counters.verify_s += time.perf_counter() - t0
            self.counters.rejected_blocks += len(refs) - good
        self.index.unpin(self.node, refs[good:])
        return pool, refs[:good]

    def _unpin(self, rid: str) -> None:
        _, refs = self._pins.pop(rid, (None, None))
        if refs:
            self.index.unpin(self.node, refs)

    def _save_loop(self) -> None:
        while True:
            save = self._queue.get()
            if save is None:
                return
            try:
                self._save(save)
            except Exception:  # noqa: BLE001 - a failed save is a skipped one; blocks go back
                log.exception("saving %s to the KV store failed", save.request_id)
            with self._lock:
                if self._saves.get(save.request_id) is save:
                    del self._saves[save.request_id]
                    self._finished.append(save.request_id)
            self.on_saved()

    def _save(self, save: _Save) -> None:
        got = self.index.alloc(self.node, save.hashes)
        if got is None:
            self.counters.save_skipped += len(save.hashes)
            return
        path, refs = got
        pool = self._pools.get(path)  # this thread may wait for a mapping to be pinned
        if pool is None:  # the slots' write leases run out and free them
            self.counters.save_skipped += len(save.hashes)
            return
        where = dict(zip(save.hashes, save.block_ids))
        written: list[SlotRef] = []
        with self._save_stream():
            for ref in refs:
                with save.lock:
                    if save.cancelled:
                        break
                    pool.write(ref.slot, ref.gen, ref.block_hash,
                               self.kv_cache[:, :, where[ref.block_hash]],
                               crc=self.verify == "crc")
                written.append(ref)
        self.counters.saved_blocks += self.index.commit(self.node, written)

    def _save_stream(self):
        """Where the saver thread's device->host copies run: the copier's save stream on
        CUDA (never the compute stream), nowhere special on CPU."""
        if self._copier is None:
            return contextlib.nullcontext()
        return self._copier.save_stream_context()


def store_stats(store: StoreConnector | None) -> dict[str, int | float]:
    """A worker's `WorkerStats` store_* fields (zeros without a store). The load seconds
    count the slot checks with the copies: what a load of that many bytes costs the TTFT."""
    if store is None:
        return {}
    c = store.counters
    out = {"store_lookups": c.lookups, "store_hit_blocks": c.hit_blocks,
           "store_hit_tokens": c.hit_tokens, "store_saved_blocks": c.saved_blocks,
           "store_save_skipped": c.save_skipped,
           "store_loaded_bytes": c.loaded_bytes, "store_load_seconds": c.load_s + c.verify_s}
    if store.puller is not None:
        p = store.puller.counters
        out.update(store_pulled_blocks=p.blocks, store_pulled_bytes=p.bytes,
                   store_pull_seconds=p.seconds)
    return out
