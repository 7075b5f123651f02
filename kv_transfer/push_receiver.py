"""The prefill -> decode push as a KV connector (engine/kv_connector.py): the receiving
side (the sending side is `kv_transfer/connector.py`).

`PushReceiver` (decode worker): a reservation's tokens past its cached prefix count as
loaded from elsewhere once the receiver says COMPLETE. Nothing runs with the forward pass:
the prefill side writes the blocks itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pdserve.engine.kv_connector import KVConnector, LoadSpec, PassiveWorkerHalf, StepTransfers
from pdserve.engine.sequence import Sequence as Seq
from pdserve.kv_transfer.base import KVReceiver, KVSink, KVTransferError, TransferStatus
from pdserve.kv_transfer.registry import make_receiver

if TYPE_CHECKING:
    import torch

    from pdserve.engine.scheduler import ScheduledSeq

log = logging.getLogger("pdserve.kv")


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

