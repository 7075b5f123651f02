"""The `local` transport: sender and receiver in one process (colocated runs, tests).

The simplest reference of the protocol: `send_layer` copies straight from the sender's
pool into the receiver's through the same validation and bookkeeping as the gRPC receiver
(`BlockReceiver.begin / write / finish`), so both transports behave alike. Receivers are
found by name in a module-level table.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import torch

from pdserve.kv_transfer.base import KVSender, KVSink, KVTransferError, LayerTracker, SendHandle
from pdserve.kv_transfer.receiver import BlockReceiver, ChunkRejected, transfer_error

_RECEIVERS: dict[str, LocalKVReceiver] = {}
_LOCK = threading.Lock()
_NAMES = itertools.count()


class LocalKVReceiver(BlockReceiver):
    """A receiver registered in this process under `name` (generated when not given)."""

    transport = "local"

    def __init__(self, pool: torch.Tensor, compat_key: str, name: str | None = None) -> None:
        super().__init__(pool, compat_key)
        self._name = name or f"local-kv-{next(_NAMES)}"
        with _LOCK:
            if self._name in _RECEIVERS:
                raise ValueError(f"a local KV receiver named {self._name!r} already exists")
            _RECEIVERS[self._name] = self

    @property
    def address(self) -> str:
        return self._name

    def close(self) -> None:
        with _LOCK:
            if _RECEIVERS.get(self._name) is self:
                del _RECEIVERS[self._name]


class LocalKVSender(KVSender):
    transport = "local"

    def open(self, sink: KVSink, src_block_ids: Sequence[int]) -> LocalSendHandle:
        self.check_sink(sink, src_block_ids)
        if self.tp_size > 1 or sink.rank_addresses or self.first_layer:
            raise ValueError("the local transport moves whole pools: it does not reshard KV "
                             "heads or layers between different tensor- or pipeline-parallel "
                             "layouts (use grpc)")
        src = self.source_index(self.blocks_to_send(sink, src_block_ids))
        return LocalSendHandle(sink, self.pool, src, self.compat_key)


class LocalSendHandle(SendHandle):
    """Copies each layer synchronously; the first refusal is kept and raised by `finish`."""

    def __init__(self, sink: KVSink, pool: torch.Tensor, src: torch.Tensor,
                 compat_key: str) -> None:
        self.request_id = sink.request_id
        self._sink, self._pool, self._src = sink, pool, src
        self._compat_key = compat_key
        self._tracker = LayerTracker(sink.request_id, pool.shape[0])
        self._error: KVTransferError | None = None
        self._began = False

    def send_layer(self, layer: int) -> None:
        self._tracker.claim(layer)
        if self._error is not None:
            return
        try:
            rx = self._begin()
            rx.write(self.request_id, layer, 0, self._pool[layer].index_select(1, self._src),
                     secret=self._sink.secret)
        except ChunkRejected as e:
            self._error = transfer_error(e.code, str(e))

    def finish(self, timeout: float | None = None) -> None:
        self._tracker.close()
        missing = self._tracker.missing()
        if self._error is None and missing:
            self._close_remote(abort=True)
            raise KVTransferError(f"request {self.request_id}: finish before layers {missing}")
        if self._error is None:
            self._close_remote(abort=False)
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        if not self._tracker.closed:
            self._tracker.close()
            if self._error is None:
                self._close_remote(abort=True)

    def _begin(self) -> LocalKVReceiver:
        with _LOCK:
            rx = _RECEIVERS.get(self._sink.address)
        if rx is None:
            raise ChunkRejected("UNAVAILABLE",
                                f"no local KV receiver named {self._sink.address!r}")
        if not self._began:
            rx.begin(self.request_id, self._compat_key, secret=self._sink.secret)
            self._began = True
        return rx

    def _close_remote(self, abort: bool) -> None:
        try:
            rx = self._begin()
            if abort:
                rx.sender_abort(self.request_id, "aborted by the sender",
                                secret=self._sink.secret)
            else:
                rx.finish(self.request_id, len(self._tracker.sent), secret=self._sink.secret)
        except ChunkRejected as e:
            self._error = transfer_error(e.code, str(e))


SENDER, RECEIVER = LocalKVSender, LocalKVReceiver  # picked up by kv_transfer.registry
