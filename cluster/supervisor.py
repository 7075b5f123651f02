"""The supervisor: notices dead or hung workers, takes them out of routing, replaces them.

Runs in the router process beside the gRPC server (`cluster.launcher.run_router`). Every
`health.probe_interval` seconds it asks every worker that is up for its stats, with a
timeout (`health.probe_timeout`):

- an answer feeds the routing policy and the metrics (this is the router's stats poll);
- a dead actor (`WorkerDown`, at once: Ray reports the process gone) or no answer within
  the timeout (hung) marks the worker down in the policy, so no new request goes to it.
  Requests calls find it dead first (the router's own `WorkerDown`) do the same through
  `RequestLifecycle.on_worker_down`, which also wakes the supervisor.

A down worker is replaced (`Cluster.replace_worker`): the old actor is killed (a hung one
may still hold its placement), a new one starts in the same placement group with the same
worker id, must pass the same ready and KV-key checks as at start (and, on an nccl
cluster, pair with every peer), and only then takes the old one's place: its client's
handle is swapped and the policy marks it up. A replacement that fails is tried again
after a pause; the pool is back at its configured size once every replacement succeeded.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pdserve.cluster.config import HealthSection
from pdserve.messages import WorkerStats
from pdserve.router.lifecycle import RequestLifecycle
from pdserve.router.workers import WorkerDown

if TYPE_CHECKING:
    from pdserve.cluster.launcher import Cluster
    from pdserve.router.metrics import RouterMetrics

log = logging.getLogger("pdserve.cluster")

RETRY_PAUSE_S = 5.0  # after a failed replacement, before the next try


class Supervisor:
    """Probes every worker and replaces the dead or hung ones (see the module docstring).

    Invariants: a worker is in `lifecycle.policy.down` from the moment it is found dead or
    hung until its replacement passed the start-up checks; at most one replacement per
    worker runs at a time.
    """

    def __init__(self, cluster: Cluster, lifecycle: RequestLifecycle, health: HealthSection,
                 metrics: RouterMetrics | None = None):
        self.cluster = cluster
        self.lifecycle = lifecycle
        self.health = health
        self.metrics = metrics
        self.clients = {w.worker_id: w for w in [*lifecycle.prefill, *lifecycle.decode]}
        self._replacing: dict[str, asyncio.Task] = {}
        # Its own threads for the blocking replacement calls, not the loop's default
        # executor: asyncio.run waits for that one at exit, and a replacement may wait for
        # its actor's placement for up to `replace_timeout`.
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="replace")
        self._wake = asyncio.Event()
        lifecycle.on_worker_down = lambda worker_id: self._wake.set()

    async def run(self) -> None:
        """Probe and replace until cancelled."""
        try:
            while True:
                await self.probe()
                self._start_replacements()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.health.probe_interval)
                except TimeoutError:
                    pass
        finally:
            for task in self._replacing.values():
                task.cancel()
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def probe(self) -> None:
        """Ask every worker that is up for its stats; mark the dead and the hung down."""
        policy = self.lifecycle.policy
        live = [w for w in self.clients.values() if w.worker_id not in policy.down]
        answers = await asyncio.gather(
            *(asyncio.wait_for(w.stats(), self.health.probe_timeout) for w in live),
            return_exceptions=True)
        stats: list[WorkerStats] = []
        for w, a in zip(live, answers):
            if isinstance(a, WorkerStats) and a.rank_failure:
                # A rank of its group died or hung: the worker refuses work until replaced.
                log.warning("worker %s lost a rank (%s): replacing it", w.worker_id,
                            a.rank_failure)
                self.lifecycle.worker_down(w.worker_id)
            elif isinstance(a, WorkerStats):
                stats.append(a)
            elif isinstance(a, WorkerDown):
                self.lifecycle.worker_down(w.worker_id)
            elif isinstance(a, TimeoutError):
                log.warning("worker %s did not answer a probe within %.0fs: taking it as hung",
                            w.worker_id, self.health.probe_timeout)
                self.lifecycle.worker_down(w.worker_id)
            else:  # an error inside a live worker: it answers, so it is not down
                log.warning("probe of %s failed: %s", w.worker_id, a)
        policy.update_stats(stats)
        if self.metrics is not None and stats:
            self.metrics.observe_worker_stats(stats)

    def _start_replacements(self) -> None:
        if not self.health.replace_workers:
            return
        for worker_id in sorted(self.lifecycle.policy.down):
            if worker_id not in self._replacing:
                self._replacing[worker_id] = asyncio.create_task(self._replace(worker_id))

    async def _replace(self, worker_id: str) -> None:
        try:
            log.warning("replacing worker %s", worker_id)
            try:
                # Blocking Ray calls (start, ready, checks, NCCL pairing) go to a thread.
                handle = await asyncio.get_running_loop().run_in_executor(
                    self._threads, self.cluster.replace_worker, worker_id,
                    self.health.replace_timeout)
            except Exception as e:  # noqa: BLE001 - tried again; the pool serves without it
                log.error("replacing %s failed: %s; trying again in %.0fs", worker_id, e,
                          RETRY_PAUSE_S)
                await asyncio.sleep(RETRY_PAUSE_S)
                return
            self.clients[worker_id].handle = handle
            self.lifecycle.policy.mark_up(worker_id)
            self.lifecycle.counters.workers_replaced += 1
            log.warning("worker %s replaced; serving with it again", worker_id)
        finally:
            self._replacing.pop(worker_id, None)
            self._wake.set()
