"""The prefill -> decode push as a KV connector (engine/kv_connector.py): the sending side
(the receiving side is `kv_transfer/push_receiver.py`).

`PushSender` (prefill worker): the scheduler half saves a request's blocks in the step that
completes its prompt, when the worker registered a sink for it; the worker half opens a
`SendHandle` on the sink at the start of that step, sends layer l right after the forward
pass wrote it (while layer l+1 computes), and closes the transfer after the pass, waiting
for the receiver's acknowledgement on its own threads. A finished request's blocks may be
freed once that acknowledgement came or the transfer failed; an abort frees them at once.

On the driver of a tensor- or pipeline-parallel prefill worker (`bind_ranks`), each
follower rank pushes its own heads and layers into the same sink (`rank_metadata`); the
push is done only when the driver's part and every follower's part are (collected between
steps on the engine thread), and fails as soon as any part fails — so the owner aborts
the decode side's reservation at once instead of that side waiting for its lease to run
out on a part that will never come.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pdserve.engine.kv_connector import KVConnector, LoadSpec, SaveSpec, StepTransfers
from pdserve.engine.sequence import FinishReason
from pdserve.engine.sequence import Sequence as Seq
from pdserve.kv_transfer.base import KVSender, KVSink, KVTransferError, SendHandle
from pdserve.kv_transfer.registry import make_sender

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
    done: bool = False  # acknowledged or failed, every rank's part (reported once)
    held: bool = False  # the engine keeps the request's blocks until `done`
    driver_done: bool = False  # this rank's own part acknowledged
    error: KVTransferError | None = None  # the first part that failed
    tag: int = 0  # the follower ranks' name for this push (0: they have no part)
    ranks_waiting: int = 0  # follower ranks whose part has not ended yet


# How often the engine thread asks the follower ranks about their parts while this rank's
# part is still under way (once it is done, at once and then every _RANK_POLL_FAST_S).
_RANK_POLL_S = 0.05
_RANK_POLL_FAST_S = 0.002


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
        # A rank group's followers (`bind_ranks`): how to reach them, how many, the pushes
        # they have a part in (by tag), and how to get the engine thread to ask them.
        self._ranks: Callable[[dict], list[dict]] | None = None
        self._num_ranks = 0
        self._tagged: dict[int, tuple[str, _Push]] = {}
        self._next_tag = 1
        self._wake: Callable[[], None] = lambda: None
        self._last_poll = 0.0
        self._poll_timer: threading.Timer | None = None

    # ---- owner (prefill worker) ---------------------------------------------------------------

    def bind_ranks(self, control: Callable[[dict], list[dict]],
                   wake: Callable[[], None]) -> None:
        """Count the follower ranks' parts of every push (`RankPushSender`): `control` is
        the engine's `rank_kv_control` (engine thread only, as every call that uses it
        here), `wake` makes the engine thread run `finished_transfers` soon."""
        replies = control({"op": "outcomes"})
        bad = [r for r in replies if "outcomes" not in r]
        if bad:
            raise RuntimeError(f"follower ranks without a KV push sender: {bad}")
        self._ranks, self._num_ranks, self._wake = control, len(replies), wake

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
        with self._lock:
            timer, self._poll_timer = self._poll_timer, None
        if timer is not None:
            timer.cancel()
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
        """Every save of the step as [request id, source block ids, sink, tag]: each
        follower rank opens its own transfer of its heads into the same sink, and reports
        how it ended under the tag (unique to this push: a request retried here later gets
        another)."""
        if not transfers.save:
            return None
        out = []
        with self._lock:
            for spec in transfers.save:
                push = self._pushes.get(spec.request_id)
                if push is None:
                    continue
                if self._ranks is not None and not push.tag and not push.done:
                    push.tag, self._next_tag = self._next_tag, self._next_tag + 1
                    push.ranks_waiting = self._num_ranks
                    self._tagged[push.tag] = (spec.request_id, push)
                out.append([spec.request_id, list(spec.block_ids), push.sink.to_dict(),
                            push.tag])
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
            self._tagged.pop(push.tag, None)
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
        if self._ranks is not None:
            self._collect_rank_outcomes()
        with self._lock:
            out, self._finished = self._finished, []
        return out

    # ---- internals ----------------------------------------------------------------------------

    def _finish(self, rid: str, push: _Push) -> None:
        """On a finisher thread: wait for the acknowledgement of this rank's part; the push
        ends when the follower ranks' parts have too (`_settle`)."""
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
            push.driver_done = True
            push.error = push.error or error
        if not self._settle(rid, push):
            self._wake()  # only the follower ranks' parts are left: ask them soon

    def _settle(self, rid: str, push: _Push) -> bool:
        """End the push if every part ended or one failed: report it once, and let the
        engine free the request's blocks if it holds them. True if it has ended."""
        with self._lock:
            if push.done:
                self._tagged.pop(push.tag, None)
                return True
            if push.error is None and (not push.driver_done or push.ranks_waiting > 0):
                return False
            push.done = True
            self._tagged.pop(push.tag, None)
            if push.held and self._pushes.get(rid) is push:
                del self._pushes[rid]
                self._finished.append(rid)
        self._report(rid, push, push.error)
        return True

    def _collect_rank_outcomes(self) -> None:
        """On the engine thread: ask the follower ranks which of their parts ended (not
        more often than needed), and settle the pushes that are now complete or failed."""
        now = time.monotonic()
        with self._lock:
            waiting = list(self._tagged.values())
            urgent = any(p.driver_done or p.error for _, p in waiting)
        if not waiting:
            return
        if now - self._last_poll < (_RANK_POLL_FAST_S if urgent else _RANK_POLL_S):
            self._poll_later(_RANK_POLL_FAST_S if urgent else _RANK_POLL_S)
            return
        self._last_poll = now
        try:
            replies = self._ranks({"op": "outcomes"})
        except Exception as e:  # noqa: BLE001 - the rank group is broken: no part completes
            for rid, push in waiting:
                with self._lock:
                    push.error = push.error or KVTransferError(
                        f"{rid}: the prefill worker's follower ranks are unreachable: {e}")
                self._settle(rid, push)
            return
        more = False
        for rank, reply in enumerate(replies, start=1):
            more = more or bool(reply.get("more"))
            for tag, error in (reply.get("outcomes") or {}).items():
                with self._lock:
                    rid, push = self._tagged.get(int(tag), (None, None))
                    if push is None:
                        continue  # aborted, or already failed by another part
                    push.ranks_waiting -= 1
                    if error and push.error is None:
                        push.error = KVTransferError(
                            f"{rid}: the KV push of prefill rank {rank} failed: {error}")
                self._settle(rid, push)
        with self._lock:
            left = bool(self._tagged)
        if more:
            self._wake()
        elif left:
            self._poll_later(_RANK_POLL_FAST_S if urgent else _RANK_POLL_S)

    def _poll_later(self, delay: float) -> None:
        """Wake the engine thread after `delay` (once: a pending wake-up covers this)."""
        with self._lock:
            if self._poll_timer is not None and self._poll_timer.is_alive():
                return
            self._poll_timer = threading.Timer(delay, self._wake)
            self._poll_timer.daemon = True
            self._poll_timer.start()

    def _report(self, rid: str, push: _Push, error: KVTransferError | None) -> None:
        seconds = time.perf_counter() - push.opened_at if push.opened_at else 0.0
        try:
            self._on_done(TransferOutcome(rid, error, seconds, len(push.sink.block_ids)))
        except Exception:  # noqa: BLE001 - the owner's bug must not stop the transfer's cleanup
            log.exception("on_done failed for %s", rid)
