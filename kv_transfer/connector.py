"""The prefill -> decode push as a KV connector (engine/kv_connector.py), both sides.

`PushSender` (prefill worker): the scheduler half saves a request's blocks in the step that
completes its prompt, when the worker registered a sink for it; the worker half opens a
`SendHandle` on the sink at the start of that step, sends layer l right after the forward
pass wrote it (while layer l+1 computes), and closes the transfer after the pass, waiting
for the receiver's acknowledgement on its own threads. A finished request's blocks may be
freed once that acknowledgement came or the transfer failed; an abort frees them at once.

`PushReceiver` (decode worker): a reservation's tokens past its cached prefix count as
loaded from elsewhere once the receiver says COMPLETE. Nothing runs with the forward pass:
the prefill side writes the blocks itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pdserve.engine.kv_connector import (
    KVConnector,
    LoadSpec,
    PassiveWorkerHalf,
    SaveSpec,
    StepTransfers,
)
from pdserve.engine.sequence import FinishReason
from pdserve.engine.sequence import Sequence as Seq
from pdserve.kv_transfer.base import (
    KVReceiver,
    KVSender,
    KVSink,
    KVTransferError,
    SendHandle,
    TransferStatus,
)
from pdserve.kv_transfer.registry import make_receiver, make_sender

if TYPE_CHECKING:
    import torch

    from pdserve.engine.scheduler import ScheduledSeq

log = logging.getLogger("pdserve.kv")


@dataclass(frozen=True, slots=True)
class TransferOutcome:
    """How one push ended: `error` is None when the receiver acknowledged every layer."""

    request_id: str
    error: KVTransferError | None
    seconds: float  # open -> acknowledged (or failed)
    num_blocks: int  # blocks sent (the sink's)


@dataclass(slots=True)
class _Push:
    sink: KVSink
    handle: SendHandle | None = None
    opened_at: float = 0.0
    closing: bool = False  # finish or abort was called on the handle (by exactly one party)
    done: bool = False  # acknowledged or failed
    held: bool = False  # the engine keeps the request's blocks until `done`


class PushSender(KVConnector):
    """Prefill side. `send(request_id, sink)` before the request enters the engine; every
    push ends in exactly one `on_done(outcome)` call (from a finisher thread, or from the
    engine thread when the sink is refused at open), unless the request is aborted first."""

    def __init__(self, transport: str, on_done: Callable[[TransferOutcome], None],
                 transfer_timeout: float = 30.0, fail_next: int = 0, **sender_opts: Any):
        """`sender_opts` go to the transport's sender; a tensor-parallel prefill worker's
        driver passes `tp_size` (it is rank 0): its sender then sends only its own heads,
        and each follower rank's `RankPushSender` sends its own (`rank_metadata`)."""
        self.transport = transport
        self.transfer_timeout = transfer_timeout
        self._on_done = on_done
        self._opts = sender_opts
        self._fail_next = fail_next  # fault-injection tests: the next N pushes fail after sending
        self.sender: KVSender | None = None
        self._pushes: dict[str, _Push] = {}
        self._finished: list[str] = []
        self._step: list[tuple[str, _Push]] = []
        self._lock = threading.Lock()
        self._finishers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-finish")

    # ---- owner (prefill worker) ---------------------------------------------------------------

    def send(self, request_id: str, sink: KVSink) -> None:
        """Push `request_id`'s prompt KV into `sink` when the engine completes its prompt."""
        with self._lock:
            if request_id in self._pushes:
                raise ValueError(f"request {request_id!r} already has a KV sink")
            self._pushes[request_id] = _Push(sink)

    def forget(self, request_id: str) -> None:
        """Drop the sink of a request that never entered the engine."""
        with self._lock:
            self._pushes.pop(request_id, None)

    def close(self) -> None:
        self._finishers.shutdown(wait=False, cancel_futures=True)
        if self.sender is not None:
            self.sender.close()

    # ---- scheduler half -----------------------------------------------------------------------

    def num_external_tokens(self, seq: Seq, num_local_tokens: int) -> int:
        return 0

    def build_step(self, batch: Sequence[ScheduledSeq], load: Sequence[LoadSpec]
                   ) -> StepTransfers:
        save = []
        with self._lock:
            for item in batch:
                push = self._pushes.get(item.seq.request_id)
                if push is None or not item.samples or push.handle is not None or push.closing:
                    continue
                n = push.sink.first_block + len(push.sink.block_ids)
                save.append(SaveSpec(item.seq.request_id, tuple(item.seq.block_ids[:n]),
                                     item.seq.num_prompt_tokens))
        return StepTransfers(load=tuple(load), save=tuple(save))

    def rank_metadata(self, transfers: StepTransfers) -> list | None:
        """Every save of the step as [request id, source block ids, sink]: each follower
        rank opens its own transfer of its heads into the same sink."""
        if not transfers.save:
            return None
        out = []
        with self._lock:
            for spec in transfers.save:
                push = self._pushes.get(spec.request_id)
                if push is not None:
                    out.append([spec.request_id, list(spec.block_ids), push.sink.to_dict()])
        return out

    def request_finished(self, seq: Seq) -> bool:
        rid = seq.request_id
        abort: SendHandle | None = None
        with self._lock:
            push = self._pushes.get(rid)
            if push is None:
                return True
            if seq.finish_reason is not FinishReason.ABORT and push.handle is not None \
                    and not push.done:
                push.held = True
                return False
            del self._pushes[rid]
            if push.handle is not None and not push.closing:
                push.closing, abort = True, push.handle
        if abort is not None:
            abort.abort()  # does not block; the source blocks may be freed once it returned
        elif not push.done and seq.finish_reason is not FinishReason.ABORT:
            self._report(rid, push, KVTransferError(f"no KV transfer was opened for {rid}"))
        return True

    # ---- worker half --------------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        self.sender = make_sender(self.transport, kv_cache, compat_key, **self._opts)

    def start_step(self, transfers: StepTransfers) -> None:
        if transfers.load:
            raise RuntimeError("the push sender loads nothing")
        assert self.sender is not None, "register_kv_cache was not called"
        for spec in transfers.save:
            with self._lock:
                push = self._pushes.get(spec.request_id)
            if push is None:
                continue
            try:
                # The router renews the lease on the decode side while this prefill runs
                # (router.lifecycle), so the deadline the sink was reserved with may have
                # passed by the time the prompt is done: the push gets `transfer_timeout`
                # from now. A reservation that did expire is refused by the receiver at once.
                sink = replace(push.sink, deadline=max(push.sink.deadline,
                                                       time.time() + self.transfer_timeout))
                handle = self.sender.open(sink, spec.block_ids)
            except (KVTransferError, ValueError) as e:
                # The prompt still finishes computing; its blocks are freed when it does.
                with self._lock:
                    push.closing = push.done = True
                err = e if isinstance(e, KVTransferError) else KVTransferError(str(e))
                self._report(spec.request_id, push, err)
                continue
            with self._lock:
                push.handle, push.opened_at = handle, time.perf_counter()
            self._step.append((spec.request_id, push))

    def wait_for_layer(self, layer: int) -> None:
        pass

    def save_layer(self, layer: int) -> None:
        for _, push in self._step:
            if not push.closing:  # not aborted since the step began
                push.handle.send_layer(layer)

    def end_step(self) -> None:
        step, self._step = self._step, []
        for rid, push in step:
            with self._lock:
                if push.closing:
                    continue
                push.closing = True
            self._finishers.submit(self._finish, rid, push)

    def finished_transfers(self) -> list[str]:
        with self._lock:
            out, self._finished = self._finished, []
        return out

    # ---- internals ----------------------------------------------------------------------------

    def _finish(self, rid: str, push: _Push) -> None:
        """On a finisher thread: wait for the acknowledgement, then let the blocks go."""
        error: KVTransferError | None = None
        try:
            with self._lock:
                inject, self._fail_next = self._fail_next > 0, max(0, self._fail_next - 1)
            if inject:
                push.handle.abort()
                raise KVTransferError(f"injected transfer failure for {rid}")
            push.handle.finish(self.transfer_timeout)
        except KVTransferError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - reported to the owner as a failed transfer
            error = KVTransferError(f"{rid}: {e}")
        with self._lock:
            push.done = True
            if push.held and self._pushes.get(rid) is push:
                del self._pushes[rid]
                self._finished.append(rid)
        self._report(rid, push, error)

    def _report(self, rid: str, push: _Push, error: KVTransferError | None) -> None:
        seconds = time.perf_counter() - push.opened_at if push.opened_at else 0.0
        try:
            self._on_done(TransferOutcome(rid, error, seconds, len(push.sink.block_ids)))
        except Exception:  # noqa: BLE001 - the owner's bug must not stop the transfer's cleanup
            log.exception("on_done failed for %s", rid)


class PushReceiver(PassiveWorkerHalf, KVConnector):
    """Decode side: owns the transport's receiver; `expect` publishes a reservation's sink,
    `cancel` forgets it (before its blocks are freed or once they are adopted).

    On the driver of a tensor- or pipeline-parallel decode worker (`bind_ranks`), every
    follower rank has its own receiver (`RankPushReceiver`) for the KV heads and layers its
    pool holds (the sink says where each rank's layers start: `KVSink.rank_layers`): `expect`
    and `cancel` reach all of them, the sink lists every rank's address, and a
    reservation's tokens count as loaded only when every rank's part is COMPLETE. All of
    `expect`, `cancel`, `num_external_tokens` and `rank_status` then run on the engine
    thread (they use the rank group)."""

    def __init__(self, transport: str, **receiver_opts: Any):
        self.transport = transport
        self._opts = receiver_opts
        self.receiver: KVReceiver | None = None
        self._block_size = 0
        self._sinks: dict[str, KVSink] = {}
        self._lock = threading.Lock()
        self._ranks: Callable[[dict], list[dict]] | None = None
        self._rank_addresses: tuple[str, ...] = ()
        self._rank_layers: tuple[int, ...] = ()

    def bind_ranks(self, control: Callable[[dict], list[dict]]) -> None:
        """Reach the follower ranks' receivers through `control` (the engine's
        `rank_kv_control`); asks each for its address once."""
        assert self.receiver is not None, "register_kv_cache was not called"
        replies = control({"op": "address"})
        bad = [r for r in replies if "address" not in r]
        if bad:
            raise RuntimeError(f"follower ranks without a KV receiver: {bad}")
        self._ranks = control
        self._rank_addresses = (self.receiver.address, *(r["address"] for r in replies))
        # A decode worker of pipeline stages: where each rank's layers start (the driver,
        # rank 0, holds stage 0's). Empty when every rank holds every layer.
        firsts = (0, *(int(r.get("first_layer", 0)) for r in replies))
        self._rank_layers = firsts if any(firsts) else ()

    @property
    def has_ranks(self) -> bool:
        return self._ranks is not None

    def expect(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
               deadline: float, first_block: int = 0) -> KVSink:
        """Register a reservation's fresh blocks with the receiver(s); returns the sink."""
        assert self.receiver is not None, "register_kv_cache was not called"
        sink = self.receiver.expect(request_id, block_ids, num_tokens, deadline, first_block)
        if self._ranks is not None:
            try:
                self._rank_call({"op": "expect", "request_id": request_id,
                                 "block_ids": list(block_ids), "num_tokens": num_tokens,
                                 "deadline": deadline, "first_block": first_block,
                                 "secret": sink.secret})
            except BaseException:
                self.cancel(request_id)
                raise
            sink = replace(sink, rank_addresses=self._rank_addresses,
                           rank_layers=self._rank_layers)
        with self._lock:
            self._sinks[request_id] = sink
        return sink

    def cancel(self, request_id: str) -> None:
        """Forget a reservation: no byte lands in its blocks after this returns."""
        self.receiver.cancel(request_id)
        with self._lock:
            self._sinks.pop(request_id, None)
        if self._ranks is not None:
            try:
                self._rank_call({"op": "cancel", "request_id": request_id})
            except Exception as e:  # noqa: BLE001 - a broken group serves nothing more;
                # the caller must still free the driver's blocks
                log.warning("cancelling %s on the follower ranks failed: %s", request_id, e)

    def rank_status(self, request_id: str) -> TransferStatus:
        """The follower ranks' parts together: FAILED if any failed or was forgotten,
        COMPLETE if all are, else PENDING (COMPLETE with no followers)."""
        if self._ranks is None:
            return TransferStatus.COMPLETE
        states = {TransferStatus(r["status"]) for r in
                  self._rank_call({"op": "status", "request_id": request_id})}
        if states & {TransferStatus.FAILED, TransferStatus.UNKNOWN}:
            return TransferStatus.FAILED
        return TransferStatus.PENDING if TransferStatus.PENDING in states \
            else TransferStatus.COMPLETE

    def _rank_call(self, op: dict) -> list[dict]:
        replies = self._ranks(op)
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            raise KVTransferError(f"follower rank refused {op['op']}: {errors[0]}")
        return replies

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()

    # ---- scheduler half -----------------------------------------------------------------------

    def num_external_tokens(self, seq: Seq, num_local_tokens: int) -> int:
        with self._lock:
            sink = self._sinks.get(seq.request_id)
        if sink is None or num_local_tokens != sink.first_block * self._block_size:
            return 0
        if self.receiver.status(seq.request_id) is not TransferStatus.COMPLETE:
            return 0
        if self.rank_status(seq.request_id) is not TransferStatus.COMPLETE:
            return 0
        return sink.num_tokens - num_local_tokens

    def build_step(self, batch: Sequence[ScheduledSeq], load: Sequence[LoadSpec]
                   ) -> StepTransfers:
        return StepTransfers(load=tuple(load))

    def request_finished(self, seq: Seq) -> bool:
        return True

    # ---- worker half --------------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        self.receiver = make_receiver(self.transport, kv_cache, compat_key, **self._opts)
        self._block_size = kv_cache.shape[3]

