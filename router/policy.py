"""Routing policies: which prefill worker and which decode worker serve a request.

Default: the prefill worker with the fewest requests in flight from this router, and the
decode worker with the most free KV blocks (last polled stats, minus what this router has
reserved on it since). Ties go round-robin so equal workers share load.
"""

from __future__ import annotations

import itertools

from pdserve.router.workers import DecodeClient, PrefillClient


class RoutingPolicy:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.free_blocks: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        # One tie-break counter per pool: a shared one would advance in lock-step (one
        # prefill pick, one decode pick per request) and always break ties the same way.
        self._tie_prefill = itertools.count()
        self._tie_decode = itertools.count()

    def update_stats(self, stats: list[dict]) -> None:
        for s in stats:
            self.free_blocks[s["worker_id"]] = int(s["free_blocks"])

    def pick_prefill(self, workers: list[PrefillClient], exclude=frozenset()) -> PrefillClient:
        pool = [w for w in workers if w.worker_id not in exclude] or workers
        turn = next(self._tie_prefill)
        return min(pool, key=lambda w: (self.in_flight.get(w.worker_id, 0),
                                        (pool.index(w) - turn) % len(pool)))

    def pick_decode(self, workers: list[DecodeClient], n_prompt: int,
                    exclude=frozenset()) -> DecodeClient:
        pool = [w for w in workers if w.worker_id not in exclude] or workers
        turn = next(self._tie_decode)
        return max(pool, key=lambda w: (self.free_blocks.get(w.worker_id, 0),
                                        -((pool.index(w) - turn) % len(pool))))

    def on_reserved(self, d: DecodeClient, n_prompt: int) -> None:
        need = -(-n_prompt // self.block_size)
        self.free_blocks[d.worker_id] = self.free_blocks.get(d.worker_id, 0) - need
