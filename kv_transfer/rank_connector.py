"""The follower ranks' halves of the prefill -> decode push (engine/kv_connector.py,
`KVConnectorRank`): each rank of a tensor- or pipeline-parallel worker moves the KV heads
and layers its own pool holds, straight to or from the peer ranks that hold the same heads.
No rank gathers.

`RankPushSender` (a prefill worker's follower rank): the driver's `PushSender` puts every
save of a step into the step's rank metadata; this rank opens its own transfer into the
same sink (`KVSender.routes`: to each decode rank that holds any of its heads), sends each
layer as the forward pass writes it, and closes it after the pass. A rank of pipeline stage
s sends only its stage's layers (`first_layer` on): every stage's ranks push in the same
step, and the decode side completes the request once every stage's layers arrived. Each
part's outcome (acknowledged, refused, failed) is kept until the driver collects it
(`control({"op": "outcomes"})`): a push is done only when every rank's part is, and one
failed part fails it at once — a part that never reaches its decode rank is otherwise
invisible to the decode side until the reservation's lease runs out.

`RankPushReceiver` (a decode worker's follower rank): a receiver on its own port for its
heads; the driver's `PushReceiver` makes and forgets its reservations (`control`), and asks
whether its part is complete before the request may decode.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pdserve.engine.kv_connector import KVConnectorRank
from pdserve.kv_transfer.base import KVReceiver, KVSender, KVSink, KVTransferError, SendHandle
from pdserve.kv_transfer.registry import make_receiver, make_sender

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pdserve.kv")

# A control reply must stay under 1 KiB encoded (KVConnectorRank.control): outcomes beyond
# this many bytes wait for the next collection, and error texts are cut.
_REPLY_BYTES = 900
_ERROR_CHARS = 200


class RankPushSender(KVConnectorRank):
    """Tensor-parallel rank `tp_rank` of a prefill worker's pipeline stage whose first
    layer is `first_layer`: pushes its own KV heads of its stage's layers."""

    def __init__(self, transport: str, tp_rank: int, tp_size: int,
                 transfer_timeout: float = 30.0, first_layer: int = 0,
                 num_kv_heads: int | None = None, misroute_next: int = 0):
        """`misroute_next` (fault tests): the next N pushes of this rank go to a loopback
        port nobody listens on — a part that fails without the decode side ever hearing
        of it."""
        self.transport = transport
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_kv_heads = num_kv_heads  # the model's (None: tp_size * the pool's heads)
        self.first_layer = first_layer
        self.transfer_timeout = transfer_timeout
        self.sender: KVSender | None = None
        self._step: list[tuple[int, SendHandle]] = []
        self._finishers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-rank-finish")
        self._misroute_next = misroute_next
        self._lock = threading.Lock()
        self._outcomes: dict[int, str] = {}  # push tag -> "" (acknowledged) or the error
        self.failures = 0  # transfers of this rank that did not complete (for stats, tests)

    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        opts = {"first_layer": self.first_layer} if self.first_layer else {}
        if self.num_kv_heads is not None:
            opts["num_kv_heads"] = self.num_kv_heads
        self.sender = make_sender(self.transport, kv_cache, compat_key, tp_rank=self.tp_rank,
                                  tp_size=self.tp_size, **opts)

    def start_rank_step(self, meta: list) -> None:
        assert self.sender is not None, "register_kv_cache was not called"
        for request_id, block_ids, sink, tag in meta:
            try:
                self._step.append((int(tag), self.sender.open(self._route(sink), block_ids)))
            except (KVTransferError, ValueError) as e:
                self._record(int(tag), f"refused at open: {e}")
                log.warning("rank %d: KV push of %s refused at open: %s", self.tp_rank,
                            request_id, e)

    def wait_for_layer(self, layer: int) -> None:
        pass

    def save_layer(self, layer: int) -> None:
        for _, handle in self._step:
            handle.send_layer(layer)

    def end_step(self) -> None:
        step, self._step = self._step, []
        for tag, handle in step:
            self._finishers.submit(self._finish, tag, handle)

    def control(self, op: dict) -> dict:
        """{"op": "outcomes"}: the parts that ended since the last call, as {"outcomes":
        {tag: "" or error}}, with "more": true when some did not fit this reply."""
        if op.get("op") != "outcomes":
            return {"error": f"a prefill rank answers no {op.get('op')!r}"}
        out: dict[str, str] = {}
        with self._lock:
            for tag in list(self._outcomes):
                entry = json.dumps({str(tag): self._outcomes[tag]})
                if len(json.dumps(out)) + len(entry) > _REPLY_BYTES:
                    return {"outcomes": out, "more": True}
                out[str(tag)] = self._outcomes.pop(tag)
        return {"outcomes": out}

    def _route(self, sink: dict) -> KVSink:
        parsed = KVSink.from_dict(sink)
        with self._lock:
            misroute, self._misroute_next = self._misroute_next > 0, max(0, self._misroute_next - 1)
        if not misroute:
            return parsed
        with socket.socket() as s:  # bound, then closed: nothing listens there
            s.bind(("127.0.0.1", 0))
            closed = f"127.0.0.1:{s.getsockname()[1]}"
        n = len(parsed.rank_addresses)
        return replace(parsed, address=closed, rank_addresses=(closed,) * n)

    def _finish(self, tag: int, handle: SendHandle) -> None:
        try:
            handle.finish(self.transfer_timeout)
        except Exception as e:  # noqa: BLE001 - reported to the driver
            self._record(tag, str(e))
            log.warning("rank %d: KV push of %s failed: %s", self.tp_rank, handle.request_id, e)
            return
        self._record(tag, "")

    def _record(self, tag: int, error: str) -> None:
        with self._lock:
            # ASCII, so the JSON reply is as long as counted (no escapes past 2 a char).
            self._outcomes[tag] = error.encode("ascii", "replace").decode()[:_ERROR_CHARS]
            if error:
                self.failures += 1

    def close(self) -> None:
        self._finishers.shutdown(wait=False, cancel_futures=True)
        if self.sender is not None:
            self.sender.close()


class RankPushReceiver(KVConnectorRank):
    """A follower rank of a tensor- or pipeline-parallel decode worker: receives its own KV
    heads of its stage's layers (its pool's layer 0 is the model's `first_layer`)."""

    def __init__(self, transport: str, first_layer: int = 0, **receiver_opts: Any):
        self.transport = transport
        self.first_layer = first_layer
        self._opts = receiver_opts
        self.receiver: KVReceiver | None = None

    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        self.receiver = make_receiver(self.transport, kv_cache, compat_key, **self._opts)

    def start_rank_step(self, meta: list) -> None:
        raise RuntimeError("a decode rank receives outside steps")

    def wait_for_layer(self, layer: int) -> None:
        pass

    def save_layer(self, layer: int) -> None:
        pass

    def end_step(self) -> None:
        pass

    def control(self, op: dict) -> dict:
        rx = self.receiver
        if rx is None:
            return {"error": "the KV pool is not allocated yet"}
        kind = op.get("op")
        if kind == "address":
            return {"address": rx.address, "first_layer": self.first_layer}
        if kind == "expect":
            rx.expect(str(op["request_id"]), [int(b) for b in op["block_ids"]],
                      int(op["num_tokens"]), float(op["deadline"]), int(op["first_block"]),
                      secret=str(op["secret"]))
            return {}
        if kind == "cancel":
            rx.cancel(str(op["request_id"]))
            return {}
        if kind == "status":
            return {"status": rx.status(str(op["request_id"])).value}
        return {"error": f"unknown KV request {kind!r}"}

    @property
    def num_reservations(self) -> int:
        return self.receiver.num_reservations if self.receiver is not None else 0

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
