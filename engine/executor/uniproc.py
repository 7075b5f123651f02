"""The whole model in the driver's own process: no ranks, no communication."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.engine.config import EngineConfig
from pdserve.engine.executor.base import Executor
from pdserve.engine.executor.rank_worker import RankWorker
from pdserve.engine.executor.step import StepInput, StepOutput
from pdserve.engine.parallel import SINGLE

if TYPE_CHECKING:
    from pdserve.engine.kv_connector import KVConnectorWorker


class UniprocExecutor(Executor):
    """Runs every step on this process's `ModelRunner` (TP and PP size 1)."""

    def __init__(self, config: EngineConfig):
        if config.parallel.world_size != 1:
            raise ValueError(
                f"UniprocExecutor runs one rank; tensor_parallel_size="
                f"{config.parallel.tensor_parallel_size} needs a rank group "
                "(engine.executor.multiproc)")
        self.worker = RankWorker(config, SINGLE)
        self.worker.allocate_kv(self.worker.default_num_blocks())

    def execute_model(
        self, step: StepInput, kv_connector: KVConnectorWorker | None = None
    ) -> StepOutput:
        return StepOutput(self.worker.runner.execute(step, kv_connector))
