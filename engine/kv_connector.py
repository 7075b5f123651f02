"""The KV connector seam: how KV that lives elsewhere gets into this engine's blocks and how
KV computed here gets out, split the way vLLM v1 splits it.

The *scheduler half* answers the engine's scheduler, on the engine thread, between steps:
how many of a request's tokens can be loaded from elsewhere, which blocks to save in this
step, and whether a finished request's blocks may be freed yet. The *worker half* runs with
the forward pass: start loading, wait for layer l, save layer l, and which transfers
finished. One object implements both (`KVConnector`): this engine's scheduler and model
runner share a process.

Implementations live with the transports (the prefill -> decode push: its sending side in
kv_transfer/connector.py, its receiving side in kv_transfer/push_receiver.py); the global
KV store is another. The engine imports no transport: it only calls these methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler imports this module
    import torch

    from pdserve.engine.scheduler import ScheduledSeq
    from pdserve.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Load tokens `[first_token, first_token + num_tokens)` of a request into its blocks
    (`block_ids`: the request's blocks in this pool, in order) during this step."""

    request_id: str
    block_ids: tuple[int, ...]
    first_token: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Save a request's prompt KV from `block_ids` (its blocks in this pool, in order, all of
    them) layer by layer as this step writes it; the step completes the prompt."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class StepTransfers:
    """What the worker half does in one step (vLLM's connector metadata)."""

    load: tuple[LoadSpec, ...] = ()
    save: tuple[SaveSpec, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.load or self.save)


class KVConnectorScheduler(ABC):
    """The scheduler half. Called on the engine thread only.

    Invariants:
    - tokens reported by `num_external_tokens` are counted as computed without running the
      model over them: they must be in the request's blocks by the time attention reads
      them (loaded in the admitting step: `wait_for_layer`; or already written, for a
      request the engine adopts);
    - `request_finished` is called once for every request that leaves the engine (finished
      or aborted). When it returns False the engine keeps the request's blocks untouched
      until the worker half lists the request in `finished_transfers`, or until the owner
      aborts the request: then it is called again, with `seq.finish_reason` ABORT;
    - for an aborted request it returns True, having stopped every transfer that would
      still write its blocks or read them from the pool (the blocks are freed at once).
    """

    @abstractmethod
    def num_external_tokens(self, seq: Sequence, num_local_tokens: int) -> int:
        """How many of `seq`'s tokens after its first `num_local_tokens` (computed here, or
        found in this engine's prefix cache) this connector provides; 0 for none.

        For a waiting request the engine allocates blocks for them and lists them in the
        admitting step's `StepTransfers.load`; for a request being adopted (its prompt KV
        pushed into reserved blocks) they must already be written."""

    @abstractmethod
    def build_step(self, batch: Seq[ScheduledSeq], load: Seq[LoadSpec]) -> StepTransfers:
        """The worker half's work for this step: `load` (what the scheduler admitted with
        external tokens) and which requests' blocks to save."""

    @abstractmethod
    def request_finished(self, seq: Sequence) -> bool:
        """`seq` left the engine (see `seq.finish_reason`); True if its blocks may be freed
        now, False to keep them until the worker half reports the request finished."""

    def rank_metadata(self, transfers: StepTransfers) -> list | None:
        """What the follower ranks' connectors (`KVConnectorRank.start_rank_step`) need to
        do their share of `transfers` — plain msgpack-able data, it crosses processes in the
        step's `StepInput.kv` — or None when followers move nothing this step. A connector
        whose transfers involve KV heads held by other ranks must return their part here
        (the default None keeps it to a single rank: a rank group refuses its transfers)."""
        return None


class KVConnectorWorker(ABC):
    """The worker half. Called on the engine thread around and inside the forward pass.

    `register_kv_cache` comes first, once. Per step, in order: `start_step(transfers)`
    before the forward pass; for every layer `wait_for_layer(l)` before the layer's
    attention reads or writes the KV, then `save_layer(l)` right after it wrote the
    layer's K/V; `end_step()` after the forward pass, also when it failed (saves then end
    with missing layers and fail). `finished_transfers()` may be called between steps.

    Invariants: `save_layer` never blocks on the network (it snapshots or orders the copy
    before later writes of the pool, as `kv_transfer.SendHandle.send_layer` does); after
    `wait_for_layer(l)` returns, every load of this step has written layer `l`. Layer
    indices are the pool's: on a pipeline stage, `l` is the stage's own layer (model
    layer `first_layer + l`), and a step split into micro-batches calls `save_layer(l)`
    once, when the last micro-batch wrote layer `l` (every sequence of the step has it).
    """

    @abstractmethod
    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        """The engine's KV pool (engine/kv_cache/layout.py) and compatibility key, once,
        before the first step: what loads write into and saves read from."""

    @abstractmethod
    def start_step(self, transfers: StepTransfers) -> None:
        """Begin this step's loads and saves (open transfers, post reads)."""

    @abstractmethod
    def wait_for_layer(self, layer: int) -> None:
        """Block until this step's loads have written layer `layer`."""

    @abstractmethod
    def save_layer(self, layer: int) -> None:
        """Layer `layer` of this step's saves is written: send (or queue) it."""

    @abstractmethod
    def end_step(self) -> None:
        """The forward pass is over: close this step's saves without waiting for them."""

    @abstractmethod
    def finished_transfers(self) -> list[str]:
        """Requests whose blocks `request_finished` kept and whose transfers have ended since
        the last call (successfully or not): their blocks may be freed now."""


class KVConnector(KVConnectorScheduler, KVConnectorWorker):
    """Both halves in one object."""


class KVConnectorRank(KVConnectorWorker):
    """The worker half on a follower rank of a rank group (engine/executor): it moves this
    rank's share of the KV — the KV heads (or layers) its pool holds — and nothing else.
    No rank gathers another rank's KV.

    Invariants:
    - Called on the follower's one thread, in the driver's order. Per step that moves KV:
      `start_rank_step(meta)` (meta: the driver connector's `rank_metadata` of the step)
      instead of `start_step`, then the forward pass's `wait_for_layer` / `save_layer`, then
      `end_step`, also when the pass failed.
    - `control(op)` answers the driver between steps (`Executor.kv_control`): e.g. make a
      reservation in this rank's pool, forget one, say whether one is complete. The reply is
      a small JSON-able map (under 1 KiB encoded); {"error": ...} for an op it does not know.
    - Block ids mean what they mean on the driver, whose block manager alone allocates and
      frees them: a rank holds reservations only while the driver says so, and its
      `finished_transfers` stays empty (the driver decides when blocks are free).
    """

    def start_step(self, transfers: StepTransfers) -> None:
        raise RuntimeError("a follower rank's connector starts steps from rank metadata")

    @abstractmethod
    def start_rank_step(self, meta: list) -> None:
        """Begin this rank's share of the step's transfers."""

    @abstractmethod
    def control(self, op: dict) -> dict:
        """Answer one request of the driver made between steps."""

    def finished_transfers(self) -> list[str]:
        return []


class PassiveWorkerHalf(KVConnectorWorker):
    """A worker half that moves nothing inside a step (KV, if any, lands outside the
    forward pass, as a push receiver's does); `register_kv_cache` is left to the class."""

    def start_step(self, transfers: StepTransfers) -> None:
        if transfers.load:
            raise RuntimeError(f"{type(self).__name__} loads nothing inside a step")

    def wait_for_layer(self, layer: int) -> None:
        pass

    def save_layer(self, layer: int) -> None:
        pass

    def end_step(self) -> None:
        pass

    def finished_transfers(self) -> list[str]:
        return []


class NoKVConnector(PassiveWorkerHalf, KVConnector):
    """Nothing moves: what an engine without a connector uses."""

    def num_external_tokens(self, seq: Sequence, num_local_tokens: int) -> int:
        return 0

    def build_step(self, batch: Seq[ScheduledSeq], load: Seq[LoadSpec]) -> StepTransfers:
        return StepTransfers(load=tuple(load))

    def request_finished(self, seq: Sequence) -> bool:
        return True

    def register_kv_cache(self, kv_cache: torch.Tensor, compat_key: str) -> None:
        pass

