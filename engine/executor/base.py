"""The executor seam: how a worker runs one model step, in one process or over a rank group.

The engine (scheduler, block manager, sampler, detokeniser) lives on one *driver* rank. Each
step it hands the executor a `StepInput`; the executor runs the model on every rank that
holds part of the replica and returns the `StepOutput` the driver samples from. Tensor and
pipeline parallelism live behind this seam: the engine never sees ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.engine.executor.rank_worker import RankWorker
from pdserve.engine.executor.step import StepInput, StepOutput
from pdserve.engine.parallel import ParallelContext

if TYPE_CHECKING:
    from pdserve.engine.kv_connector import KVConnectorWorker


class ExecutorError(RuntimeError):
    """A rank of the group failed, died or did not answer in time; the executor is
    unusable afterwards (its ranks may be out of step) and must be rebuilt."""


@dataclass(slots=True)
class StepHandle:
    """A step `Executor.submit` started and `Executor.collect` has not returned yet:
    `output` when it already ran to its end, else the executor's own record of what to
    wait for (`pending`)."""

    step_id: int = 0
    output: StepOutput | None = None
    pending: Any = None


class Executor(ABC):
    """Runs model steps for one driver.

    Invariants:
    - Only the driver calls it, one step at a time; steps run in the order given. Every
      rank of the replica executes every step on the same `StepInput` (TP) or on its stage
      of it (PP); follower ranks never schedule, sample or free blocks.
    - Every rank holds a KV pool of `num_blocks` blocks; a block id names the same tokens on
      every rank (each rank stores its own KV heads, or its stage's layers, of them). The
      block manager on the driver is therefore the only one.
    - `execute_model` returns the full-vocabulary fp32 logits of the step's sampling
      sequences on the driver, valid until the next call.
    - A failure on any rank (an error, a dead process, a collective that times out after
      the rank group's collective timeout) raises `ExecutorError` on the driver instead of
      hanging it; after that every call raises. `shutdown` releases the followers and may
      be called more than once.
    - `worker` is the driver's own rank: its model shard, KV pool and runner, which the
      engine and the KV transports of this process use directly.
    - `submit` + `collect` is `execute_model` in two halves, so that a pipeline can hold
      up to `max_in_flight` steps at once (stage 0 runs step t + 1 while stage 1 runs step
      t). Steps are collected in the order submitted, at most `max_in_flight` of them are
      outstanding, and the caller makes the steps in flight at once touch disjoint
      sequences (the new tokens of one never read or write the blocks of another's). Each
      rank runs them in the order submitted. With `max_in_flight` 1 (the default) `submit`
      runs the whole step.
    """

    worker: RankWorker

    @abstractmethod
    def execute_model(
        self, step: StepInput, kv_connector: KVConnectorWorker | None = None
    ) -> StepOutput:
        """Run one step. With `kv_connector` (the worker half of a KV connector: a step that
        loads or saves KV), the driver waits for layer l's loads before its attention and
        saves its K/V right after writing them (layer-wise KV streaming hangs off it)."""

    @property
    def max_in_flight(self) -> int:
        """How many submitted steps may be outstanding at once."""
        return 1

    def submit(self, step: StepInput, kv_connector: KVConnectorWorker | None = None
               ) -> StepHandle:
        """Start one step (see `execute_model`); `collect` returns its output."""
        return StepHandle(output=self.execute_model(step, kv_connector))

    def collect(self, handle: StepHandle) -> StepOutput:
        """The output of the oldest step submitted and not collected (`handle`), once it
        is there; its logits are valid until the next `collect` or `execute_model`."""
        return handle.output

    def shutdown(self) -> None:  # noqa: B027 - one process has nothing to release
        """Release the ranks this executor started or drives."""

    def kv_control(self, op: dict) -> list[dict]:
        """Hand `op` to every follower rank's KV connector (`KVConnectorRank.control`) and
        return their replies in rank order; [] with no followers. Driver thread only,
        between steps; a lost rank raises `ExecutorError` as a step would."""
        return []

    @property
    def failure(self) -> str | None:
        """Why this executor can run no more steps (a rank died, hung or failed), or None
        while it works. Once set it stays set: the worker serving through it must fail its
        requests with this reason and take no new ones."""
        return None

    @property
    def parallel(self) -> ParallelContext:
        """The driver rank's place in the replica's TP/PP layout."""
        return self.worker.parallel
