"""A tensor-parallel replica over a rank group: the driver rank schedules, followers execute.

The driver's engine owns the scheduler, block manager and sampler. For each step,
`MultiprocExecutor` broadcasts the `StepInput` on the group's control channel and runs its
own shard; every follower (`run_follower`) receives the same step and runs its shard, and
the layers' collectives join the shards (row-parallel all-reduce, vocabulary all-gather).
Followers run no scheduler: they only hold their KV pool, whose block ids the driver's
block manager assigns. Over pipeline stages the driver may submit the next step before
collecting this one's logits (`submit` / `collect`); followers need nothing for it, since
they run the steps in the order broadcast.

Start-up: followers build their model while the driver builds its own; the driver then
sends `init` (pool size and the keys it expects) and every rank reports whether it agrees,
so a follower with another model, dtype or layout fails the start, not a later step.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from pdserve.engine.config import EngineConfig
from pdserve.engine.executor.base import Executor, ExecutorError, StepHandle
from pdserve.engine.executor.group import RankGroup
from pdserve.engine.executor.rank_worker import RankWorker
from pdserve.engine.executor.step import StepInput, StepOutput

if TYPE_CHECKING:
    from pdserve.engine.kv_connector import KVConnectorRank, KVConnectorWorker

log = logging.getLogger("pdserve.engine")

# How long start-up may wait for the slowest rank to load its weights.
START_TIMEOUT_S = 600.0


def _check_group(config: EngineConfig, group: RankGroup) -> None:
    if group.world_size != config.parallel.world_size:
        raise ValueError(
            f"rank group of {group.world_size} ranks, but the config asks for "
            f"tensor_parallel_size={config.parallel.tensor_parallel_size} x "
            f"pipeline_parallel_size={config.parallel.pipeline_parallel_size}")
    if group.parallel.pp_size != config.parallel.pipeline_parallel_size:
        raise ValueError(f"rank group of {group.parallel.pp_size} pipeline stages, but the "
                         f"config asks for {config.parallel.pipeline_parallel_size}")


class MultiprocExecutor(Executor):
    """The driver rank (rank 0) of a rank group made by `init_rank_group`.

    KV moves rank by rank: the driver's KV connector does the driver's share of a step's
    transfers and hands the followers theirs in `StepInput.kv` (`rank_metadata`); each
    follower's `KVConnectorRank` moves the heads its own pool holds. A connector that gives
    the followers nothing (`rank_metadata` None) is refused for a step that moves KV.
    Between steps the driver reaches the followers' connectors with `kv_control`.
    """

    def __init__(self, config: EngineConfig, group: RankGroup,
                 start_timeout_s: float = START_TIMEOUT_S):
        _check_group(config, group)
        if not group.is_driver:
            raise ValueError(f"rank {group.rank} is a follower: call run_follower on it")
        self.group = group
        self._channel = group.control
        self._step_id = 0
        self._broken: str | None = None
        self._closed = False
        try:
            self.worker = RankWorker(config, group.parallel, group.device)
            self.worker.allocate_kv(self.worker.default_num_blocks())
            self._channel.send({"op": "init", "num_blocks": self.worker.num_blocks,
                                "content_key": self.worker.content_key.digest,
                                "layout_key": self.worker.layout_key.to_dict()},
                               timeout_s=start_timeout_s)
            statuses = self._channel.gather_text("", timeout_s=start_timeout_s)
        except BaseException as e:
            self._release_followers()
            if isinstance(e, RuntimeError):
                raise ExecutorError(f"rank group failed to start: {e}") from e
            raise
        refused = [f"rank {r}: {s}" for r, s in enumerate(statuses) if s]
        if refused:
            self._release_followers()  # those that accepted; the others have left
            raise ExecutorError("follower ranks refused the driver's model: " + "; ".join(refused))
        log.info("rank group of %d ready (driver rank 0, %d KV blocks per rank)",
                 group.world_size, self.worker.num_blocks)

    @property
    def max_in_flight(self) -> int:
        """A pipeline holds a step a stage; a TP-only group runs one step at a time."""
        return self.group.parallel.pp_size

    def execute_model(
        self, step: StepInput, kv_connector: KVConnectorWorker | None = None
    ) -> StepOutput:
        return self.collect(self.submit(step, kv_connector))

    def submit(self, step: StepInput, kv_connector: KVConnectorWorker | None = None
               ) -> StepHandle:
        """Broadcast the step and run the driver's part of it. Over pipeline stages the
        driver's part ends once its stage sent its hidden states on: the followers run the
        steps in the order broadcast, so the next step may be submitted before this one's
        logits are back."""
        if self._broken is not None:
            raise ExecutorError(self._broken)
        if self._closed:
            raise ExecutorError("the rank group was shut down")
        if kv_connector is not None and step.kv is None:
            raise NotImplementedError(
                "this KV connector moves only the driver rank's KV heads (its rank_metadata "
                "gave the follower ranks nothing to do): it cannot serve a rank group")
        self._step_id += 1
        runner = self.worker.runner
        msg = {"op": "step", "id": self._step_id, "step": step.to_plain()}
        try:
            if self.group.parallel.pp_size > 1:
                # Not waited for here: stage 1 takes this step only once it is done with
                # the one before, which is what the driver's stage runs beside.
                posted = self._channel.post(msg)
                return StepHandle(self._step_id,
                                  pending=(posted, runner.start_pipelined(step, kv_connector)))
            self._channel.send(msg)
            return StepHandle(self._step_id,
                              output=StepOutput(runner.execute(step, kv_connector)))
        except Exception as e:
            raise self._fail(f"step {self._step_id}", e) from e

    def collect(self, handle: StepHandle) -> StepOutput:
        if handle.output is not None:
            return handle.output
        if self._broken is not None:
            raise ExecutorError(self._broken)
        posted, started = handle.pending
        try:
            posted.wait()
            return StepOutput(self.worker.runner.finish_pipelined(started))
        except Exception as e:
            raise self._fail(f"step {handle.step_id}", e) from e

    def kv_control(self, op: dict) -> list[dict]:
        if self._broken is not None:
            raise ExecutorError(self._broken)
        try:
            self._channel.send({"op": "kv", "kv": op})
            replies = self._channel.gather_text("")
        except Exception as e:
            raise self._fail(f"KV request {op.get('op')!r}", e) from e
        return [json.loads(r) if r else {"error": "no reply"} for r in replies[1:]]

    def _fail(self, what: str, e: Exception) -> ExecutorError:
        """Mark the group broken (the ranks may now be in different places of a collective:
        it cannot go on) and close it; the error to raise."""
        self._broken = (
            f"{what} of the rank group failed: a follower rank died, hung past the "
            f"{self.group.timeout_s:g}s collective timeout, or failed itself; the rank group "
            f"is unusable, restart it ({type(e).__name__}: {e})")
        self._disband()
        return ExecutorError(self._broken)

    @property
    def failure(self) -> str | None:
        return self._broken

    def _disband(self) -> None:
        """Close this rank's sockets of the broken group, so that surviving followers'
        waits for the next step end with an error now instead of when this process exits."""
        self._closed = True
        try:
            self.group.destroy()
        except Exception as e:  # noqa: BLE001 - already torn down by the failure
            log.warning("rank group: closing the broken group failed: %s", e)

    def shutdown(self) -> None:
        """Tell the followers to return from `run_follower` (best effort if broken)."""
        if not self._closed:
            self._release_followers()

    def _release_followers(self) -> None:
        self._closed = True
        try:
            self._channel.send({"op": "stop"}, timeout_s=min(self.group.timeout_s, 10.0))
        except RuntimeError as e:  # a dead follower needs no release
            log.warning("rank group: could not tell every follower to stop: %s", e)


class Follower:
    """A follower rank: builds its shard of the driver's model, then executes the steps the
    driver broadcasts until it says stop. It never schedules, samples or frees blocks."""

    def __init__(self, config: EngineConfig, group: RankGroup,
                 kv_connector: KVConnectorRank | None = None):
        """`kv_connector`: this rank's worker half of the driver's KV connector, when the
        driver's steps move KV (a prefill worker's push, a decode worker's receive)."""
        _check_group(config, group)
        if group.is_driver:
            raise ValueError("rank 0 is the driver: build the engine with a MultiprocExecutor")
        self.group = group
        self.worker = RankWorker(config, group.parallel, group.device)
        self.kv_connector = kv_connector
        self.steps = 0

    def run(self) -> int:
        """Serve until the driver stops; returns the number of steps executed. Raises
        `ExecutorError` if the driver disappears or the step stream breaks."""
        rank, channel = self.group.rank, self.group.control
        try:
            msg = channel.recv(timeout_s=START_TIMEOUT_S)
            if msg["op"] == "stop":
                return 0
            problem = _init_problem(self.worker, msg)
            if not problem:
                self.worker.allocate_kv(int(msg["num_blocks"]))
                if self.kv_connector is not None:
                    self.kv_connector.register_kv_cache(self.worker.kv_cache,
                                                        self.worker.content_key.digest)
            channel.gather_text(problem, timeout_s=START_TIMEOUT_S)
            if problem:
                raise ExecutorError(f"rank {rank} refused the driver's model: {problem}")
            while True:
                msg = channel.recv()
                if msg["op"] == "stop":
                    return self.steps
                if msg["op"] == "kv":
                    channel.gather_text(json.dumps(self._kv_control(msg.get("kv"))))
                    continue
                if msg["op"] != "step" or msg.get("id") != self.steps + 1:
                    raise ExecutorError(f"rank {rank} expected step {self.steps + 1}, got "
                                        f"{msg['op']} {msg.get('id')}")
                self._execute(StepInput.from_plain(msg["step"]))
                self.steps += 1
        except ExecutorError:
            raise
        except RuntimeError as e:
            raise ExecutorError(f"follower rank {rank} lost the driver: {e}") from e


    def _execute(self, step: StepInput) -> None:
        conn = self.kv_connector if step.kv is not None else None
        if step.kv is not None and conn is None:
            raise ExecutorError(f"rank {self.group.rank} has no KV connector, but the "
                                "driver's step moves KV")
        if conn is None:
            self.worker.runner.execute(step)
            return
        conn.start_rank_step(step.kv)
        try:
            self.worker.runner.execute(step, conn)
        finally:
            conn.end_step()

    def _kv_control(self, op) -> dict:
        if self.kv_connector is None:
            return {"error": f"rank {self.group.rank} has no KV connector"}
        try:
            return self.kv_connector.control(op if isinstance(op, dict) else {})
        except Exception as e:  # noqa: BLE001 - the driver gets the reason, the rank lives
            return {"error": f"{type(e).__name__}: {e}"[:900]}


def run_follower(config: EngineConfig, group: RankGroup,
                 kv_connector: KVConnectorRank | None = None) -> int:
    """Serve as follower rank `group.rank` until the driver stops; returns the number of
    steps executed (see `Follower`)."""
    return Follower(config, group, kv_connector).run()


def _init_problem(worker: RankWorker, msg: dict) -> str:
    """Why this follower cannot serve the driver's model ("" if it can)."""
    if msg.get("op") != "init":
        return f"expected init, got {msg.get('op')!r}"
    if msg.get("content_key") != worker.content_key.digest:
        return (f"content key {worker.content_key.digest} differs from the driver's "
                f"{msg.get('content_key')} (model, tokenizer or dtype differ)")
    mine = worker.layout_key.to_dict()
    theirs = msg.get("layout_key") or {}
    diff = [f"{k}={mine[k]} (driver {theirs.get(k)})" for k in mine if mine[k] != theirs.get(k)]
    return "layout differs: " + ", ".join(diff) if diff else ""
