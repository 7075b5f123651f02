"""Routing policies: which prefill worker and which decode worker serve a request.

Default: the prefill worker with the fewest requests in flight from this router, the
decode worker with the most free KV blocks (last polled stats, minus what this router has
reserved on it since), and for a request a worker prefills and decodes itself (colocated)
the worker running the fewest of this router's requests, then the most free blocks. Ties go
round-robin so equal workers share load.

The policy owns its counters: the lifecycle reports what it did (`on_prefill_started`,
`on_prefill_done`, `on_reserved`) and polled stats (`update_stats`), never edits them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.messages import WorkerStats, blocks_for
from pdserve.router.workers import DecodeClient, PrefillClient

if TYPE_CHECKING:
    from pdserve.router.prefix_locator import PrefixMap


def _count(counts: dict[str, int], worker_id: str, step: int, done: str) -> None:
    """Move a worker's count by `step`; a count would go negative only through a `done`
    call without its start: a bug, raised."""
    n = counts.get(worker_id, 0) + step
    if n < 0:
        raise RuntimeError(f"{done} for {worker_id} without a matching start")
    counts[worker_id] = n


class NoWorkerUp(RuntimeError):
    """Every worker of a pool is down (dead or hung, not yet replaced)."""


class RoutingPolicy:
    """Picks workers from the router's view of the cluster.

    Invariants: `in_flight[p]` counts the requests routed to prefill worker `p` whose
    prefill has not returned (every `on_prefill_started` is matched by one
    `on_prefill_done`, success or not), so it is never negative; `local[d]` counts the
    requests this router runs on `d` itself (`on_local_started` to `on_local_done`, the
    same pairing); `free_blocks[d]` is the
    last polled figure minus what was reserved on `d` since; a worker in `down` is never
    picked (NoWorkerUp when a whole pool is down).
    """

    name = "least_loaded"

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.free_blocks: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.local: dict[str, int] = {}
        self.down: set[str] = set()  # workers found dead or hung, until replaced
        # One tie-break counter per pool: a shared one would advance in lock-step (one
        # prefill pick, one decode pick per request) and always break ties the same way.
        self._tie_prefill = itertools.count()
        self._tie_decode = itertools.count()

    def update_stats(self, stats: list[WorkerStats]) -> None:
        for s in stats:
            self.free_blocks[s.worker_id] = s.free_blocks

    # ---- liveness: a down worker is never picked -------------------------------------------

    def mark_down(self, worker_id: str) -> None:
        self.down.add(worker_id)

    def mark_up(self, worker_id: str) -> None:
        """`worker_id` runs again (a fresh process): nothing of the old one is counted."""
        self.down.discard(worker_id)
        self.free_blocks.pop(worker_id, None)

    def up(self, workers: list) -> list:
        return [w for w in workers if w.worker_id not in self.down]

    def _pool(self, workers: list, exclude, kind: str) -> list:
        """The workers to pick from: the up ones not in `exclude`, else any up one (a retry
        may go back to a worker it already tried). NoWorkerUp when none is up."""
        live = self.up(workers)
        if not live:
            raise NoWorkerUp(f"no {kind} worker is up ({len(workers)} configured, all down; "
                             "replacements are starting)")
        return [w for w in live if w.worker_id not in exclude] or live

    # ---- picks -----------------------------------------------------------------------------

    async def locate(self, token_ids: Sequence[int]) -> PrefixMap | None:
        """Where the prompt's prefix is cached, for the picks below (None: this policy does
        not look; a KV-aware one asks its locator, one round trip)."""
        return None

    def pick_prefill(self, workers: list[PrefillClient], exclude=frozenset(),
                     where: PrefixMap | None = None) -> PrefillClient:
        pool = self._pool(workers, exclude, "prefill")
        turn = next(self._tie_prefill)
        return min(pool, key=lambda w: (self.in_flight.get(w.worker_id, 0),
                                        (pool.index(w) - turn) % len(pool)))

    def pick_decode(self, workers: list[DecodeClient], n_prompt: int,
                    exclude=frozenset(), where: PrefixMap | None = None) -> DecodeClient:
        """The decode worker of a handoff (`where`: the prompt's cached prefixes, for a
        policy that weighs them)."""
        pool = self._pool(workers, exclude, "decode")
        turn = next(self._tie_decode)
        return max(pool, key=lambda w: (self.free_blocks.get(w.worker_id, 0),
                                        -((pool.index(w) - turn) % len(pool))))

    def pick_local(self, workers: list[DecodeClient], n_prompt: int,
                   where: PrefixMap | None = None, exclude=frozenset()) -> DecodeClient:
        """The decode (or colocated) worker that prefills and decodes a request itself: of
        those with room for the prompt, the one running the fewest of this router's
        requests, then the most free blocks. Polled free blocks alone go stale between
        polls (two requests a moment apart would land on one worker), and a CPU worker's
        steps, the prompt's first among them, slow with every request it runs while
        another worker may be idle."""
        pool, key = self._local_candidates(workers, n_prompt, exclude)
        return min(pool, key=key)

    def _local_candidates(self, workers: list[DecodeClient], n_prompt: int, exclude):
        """(pool, key) of a local pick: the up workers with room for the prompt (all of them
        when none has: a worker without room would only queue it), and their order —
        fewest of this router's requests, most free blocks, then round-robin."""
        pool = self._pool(workers, exclude, "decode")
        need = blocks_for(n_prompt, self.block_size)
        pool = [w for w in pool if self.free_blocks.get(w.worker_id, need) >= need] or pool
        turn = next(self._tie_decode)
        return pool, lambda w: (self.local.get(w.worker_id, 0),
                                -self.free_blocks.get(w.worker_id, 0),
                                (pool.index(w) - turn) % len(pool))

    def prefill_on_decode(self, workers: list[DecodeClient], n_prompt: int,
                          where: PrefixMap | None, threshold: int) -> bool:
        """Conditional disaggregation: prefill on a decode worker when what it would have
        to compute is at most `threshold` tokens (here: the whole prompt)."""
        return n_prompt <= threshold

    async def close(self) -> None:
        """Release what the policy holds (a locator's connections)."""

    def on_prefill_started(self, p: PrefillClient) -> None:
        """`p` was picked for a request (counted from the pick, so requests routed while
        this one still waits for decode room already see `p` as busier)."""
        _count(self.in_flight, p.worker_id, +1, "on_prefill_done")

    def on_prefill_done(self, p: PrefillClient) -> None:
        """The request picked for `p` left it: prefilled, failed or abandoned."""
        _count(self.in_flight, p.worker_id, -1, "on_prefill_done")

    def on_local_started(self, d: DecodeClient) -> None:
        """A request runs on `d` itself (prefill and decode), from the pick."""
        _count(self.local, d.worker_id, +1, "on_local_done")

    def on_local_done(self, d: DecodeClient) -> None:
        """The request started on `d` by `on_local_started` left it (finished or not)."""
        _count(self.local, d.worker_id, -1, "on_local_done")

    def on_reserved(self, d: DecodeClient, n_prompt: int,
                    where: PrefixMap | None = None) -> None:
        """`n_prompt` tokens' blocks were reserved on `d` (it caches them once the
        prompt's KV arrived)."""
        need = blocks_for(n_prompt, self.block_size)
        self.free_blocks[d.worker_id] = self.free_blocks.get(d.worker_id, 0) - need
