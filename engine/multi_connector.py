"""Several KV connectors behind one (vLLM's MultiConnector): e.g. the prefill -> decode push
and the global KV store on the same worker.

- `num_external_tokens`: the first connector, in order, that provides tokens claims the
  request; its loads go to it alone.
- `request_finished`: every connector is told; the blocks are kept until every one that
  asked to keep them has listed the request in `finished_transfers`.
- The worker half fans out; each connector sees only its own part of a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.engine.kv_connector import KVConnector, LoadSpec, StepTransfers
from pdserve.engine.sequence import FinishReason

if TYPE_CHECKING:
    import torch

    from pdserve.engine.scheduler import ScheduledSeq
    from pdserve.engine.sequence import Sequence as Seq


class MultiConnector(KVConnector):
    def __init__(self, connectors: Sequence[KVConnector]):
        if not connectors:
            raise ValueError("MultiConnector needs at least one connector")
        self.connectors = list(connectors)
        self._claimed: dict[str, int] = {}  # request -> the connector that provides its tokens
        self._held: dict[str, set[int]] = {}  # request -> connectors still keeping its blocks
        self._parts: list[StepTransfers] = []

    # ---- scheduler half -----------------------------------------------------------------------

    def num_external_tokens(self, seq: Seq, num_local_tokens: int) -> int:
        self._claimed.pop(seq.request_id, None)
        for i, c in enumerate(self.connectors):
            n = c.num_external_tokens(seq, num_local_tokens)
            if n > 0:
                self._claimed[seq.request_id] = i
                return n
        return 0

    def build_step(self, batch: Sequence[ScheduledSeq], load: Sequence[LoadSpec]
                   ) -> StepTransfers:
        mine: list[list[LoadSpec]] = [[] for _ in self.connectors]
        for spec in load:
            mine[self._claimed.pop(spec.request_id, 0)].append(spec)
        self._parts = [c.build_step(batch, mine[i]) for i, c in enumerate(self.connectors)]
        return StepTransfers(load=tuple(s for p in self._parts for s in p.load),
                             save=tuple(s for p in self._parts for s in p.save))

    def request_finished(self, seq: Seq) -> bool:
        rid = seq.request_id
        self._claimed.pop(rid, None)
        keep = {i for i, c in enumerate(self.connectors) if not c.request_finished(seq)}
        if seq.finish_reason is FinishReason.ABORT or not keep:
            self._held.pop(rid, None)
            return True
        self._held[rid] = keep
        return False

    # ---- worker half --------------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        for c in self.connectors:
            c.register_kv_cache(kv_cache, compat_key)

    def start_step(self, transfers: StepTransfers) -> None:
        parts = self._parts or [StepTransfers()] * len(self.connectors)
        for c, part in zip(self.connectors, parts):
            c.start_step(part)

    def wait_for_layer(self, layer: int) -> None:
        for c in self.connectors:
            c.wait_for_layer(layer)

    def save_layer(self, layer: int) -> None:
        for c in self.connectors:
            c.save_layer(layer)

    def end_step(self) -> None:
        self._parts = []
        error = None
        for c in self.connectors:  # every one closes its step, even after another failed
            try:
                c.end_step()
            except Exception as e:  # noqa: BLE001 - re-raised below
                error = error or e
        if error is not None:
            raise error

    def finished_transfers(self) -> list[str]:
        done = []
        for i, c in enumerate(self.connectors):
            for rid in c.finished_transfers():
                waiting = self._held.get(rid)
                if waiting is None:
                    continue
                waiting.discard(i)
                if not waiting:
                    del self._held[rid]
                    done.append(rid)
        return done
