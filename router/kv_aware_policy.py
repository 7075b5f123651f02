"""KV-aware routing: send a prompt to the worker with the lowest expected time to first
token, counting what each could reuse.

For worker w and a prompt of n tokens:

    ttft(w) = queue(w) + prefill(n - local(w) - store(w)) + load(store(w))

- `local(w)`: tokens of the prompt's prefix in w's own prefix cache (free to reuse);
- `store(w)`: tokens after that which the global KV store holds on w's node (copied from
  the node's pool at the load bandwidth);
- `queue(w)`: the uncached prompt tokens already routed to w and not prefilled yet, at the
  prefill rate;
- `prefill(k)`: k tokens at the prefill rate.

Where a prefix lives comes from a `PrefixLocator` (router/prefix_locator.py), asked once per
request (`locate`). Both rates start at configured figures and follow what the workers
measure (`update_stats`): the prefill rate from the prompt tokens a busy worker computed
between two polls, the load bandwidth from the bytes the workers loaded from the store
between two polls over the seconds those loads took (their slot checks and copies). Ties
go to the least-loaded rule of `RoutingPolicy`.

The same pricing picks the decode worker that prefills a request itself (colocated mode,
conditional disaggregation). The decode worker of a handoff is bound by memory, not by the
prefix it holds, so it is the one with the most free blocks, less (as NVIDIA Dynamo's KV
router weighs overlap against load) `decode_prefix_weight` times the blocks it would have
to receive: a prefix in its own cache is neither sent by the prefill worker nor written
into fresh blocks, so among decode workers with similar room the one holding the longest
prefix wins.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.messages import WorkerStats, blocks_for
from pdserve.router.policy import RoutingPolicy
from pdserve.router.prefix_locator import PrefixLocator, PrefixMap, prompt_block_hashes


@dataclass(slots=True)
class CostModel:
    """Rates the policy prices with; `observe_*` moves them toward measurements (an
    exponentially weighted mean, `alpha` per sample)."""

    prefill_tokens_per_s: float = 2000.0
    load_bytes_per_s: float = 2e9
    kv_bytes_per_token: int = 46080  # SmolLM2-135M in fp32: 30 layers x 2 x 3 heads x 64 x 4
    alpha: float = 0.2

    def __post_init__(self) -> None:
        if min(self.prefill_tokens_per_s, self.load_bytes_per_s, self.kv_bytes_per_token) <= 0:
            raise ValueError("CostModel rates must be positive")

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def load_s(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.load_bytes_per_s


class KVAwarePolicy(RoutingPolicy):
    """`RoutingPolicy` whose prefill pick minimises expected TTFT (module docstring).

    Invariants (besides the base class's): `pending_tokens(w)` is the sum of the uncached
    tokens of the requests picked for `w` whose prefill has not returned, so it returns to
    0 when `w` is idle; every pick and reservation made with a `PrefixMap` tells the
    locator the prompt is now held by that worker (`PrefixLocator.routed`).
    """

    name = "kv_aware"
    # Free blocks a decode worker may lack, per block of the prompt it holds, and still win.
    decode_prefix_weight = 1.0

    def __init__(self, block_size: int, locator: PrefixLocator, nodes: dict[str, str],
                 compat_key: str = "", cost: CostModel | None = None):
        super().__init__(block_size)
        self.locator = locator
        self.nodes = dict(nodes)  # worker id -> node id
        self.compat_key = compat_key
        self.cost = cost or CostModel()
        self._pending: dict[str, deque[int]] = {}
        self._last_poll: dict[str, tuple[float, int, bool]] = {}  # t, prompt tokens, busy
        self._last_loads: dict[str, tuple[int, float]] = {}  # store bytes loaded, seconds

    def pending_tokens(self, worker_id: str) -> int:
        return sum(self._pending.get(worker_id, ()))

    async def locate(self, token_ids: Sequence[int]) -> PrefixMap:
        hashes = prompt_block_hashes(token_ids, self.block_size, self.compat_key)
        workers = [w for w in self.nodes if w not in self.down]
        nodes = sorted({self.nodes[w] for w in workers})
        return await self.locator.locate(len(token_ids), hashes, workers, nodes)

    def plan(self, worker_id: str, where: PrefixMap) -> tuple[float, int, int]:
        """(expected TTFT in seconds, tokens reused locally, tokens loaded from the store)."""
        n = where.num_tokens
        local = min(where.local_tokens(worker_id), max(n - 1, 0))
        stored = min(where.store_tokens(self.nodes.get(worker_id), local),
                     max(n - 1 - local, 0))
        uncached = n - local - stored
        ttft = (self.cost.prefill_s(self.pending_tokens(worker_id) + uncached)
                + self.cost.load_s(stored))
        return ttft, local, stored

    def pick_prefill(self, workers, exclude=frozenset(), where: PrefixMap | None = None):
        if where is None:
            return super().pick_prefill(workers, exclude)
        pool = self._pool(workers, exclude, "prefill")
        turn = next(self._tie_prefill)
        return self._take(pool, where, lambda w: (self.in_flight.get(w.worker_id, 0),
                                                  (pool.index(w) - turn) % len(pool)))

    def pick_local(self, workers, n_prompt, where: PrefixMap | None = None,
                   exclude=frozenset()):
        if where is None:
            return super().pick_local(workers, n_prompt, where, exclude)
        pool, key = self._local_candidates(workers, n_prompt, exclude)
        return self._take(pool, where, key)

    def pick_decode(self, workers, n_prompt, exclude=frozenset(),
                    where: PrefixMap | None = None):
        if where is None:
            return super().pick_decode(workers, n_prompt, exclude)
        pool = self._pool(workers, exclude, "decode")
        need = blocks_for(n_prompt, self.block_size)
        bs = self.block_size

        def to_receive(w) -> int:  # what the prefill worker sends into fresh blocks
            return need - min(where.local_tokens(w.worker_id), max(n_prompt - 1, 0)) // bs

        room = [w for w in pool if self.free_blocks.get(w.worker_id, need) >= to_receive(w)]
        pool = room or pool
        turn = next(self._tie_decode)
        return min(pool, key=lambda w: (
            round(self.decode_prefix_weight * to_receive(w)
                  - self.free_blocks.get(w.worker_id, 0), 6),
            (pool.index(w) - turn) % len(pool)))

    def _take(self, pool: list, where: PrefixMap, tie):
        plans = {w.worker_id: self.plan(w.worker_id, where) for w in pool}
        best = min(pool, key=lambda w: (round(plans[w.worker_id][0], 6), *tie(w)))
        _, local, stored = plans[best.worker_id]
        self._pending.setdefault(best.worker_id, deque()).append(
            where.num_tokens - local - stored)
        self.locator.routed(best.worker_id, where.hashes)
        return best

    def on_reserved(self, d, n_prompt, where: PrefixMap | None = None) -> None:
        super().on_reserved(d, n_prompt, where)
        if where is not None:  # the decode worker caches the handed-off prompt too
            self.locator.routed(d.worker_id, where.hashes)

    def on_prefill_done(self, p) -> None:
        super().on_prefill_done(p)
        q = self._pending.get(p.worker_id)
        if q:
            q.popleft()

    def prefill_on_decode(self, workers, n_prompt, where: PrefixMap | None,
                          threshold: int) -> bool:
        """Conditional disaggregation: True when some decode worker that is up would still
        have to compute itself (after its own cache and its node's store) at most
        `threshold` tokens, so a handoff would cost more than it saves."""
        if threshold <= 0 or where is None:
            return super().prefill_on_decode(workers, n_prompt, where, threshold)
        for w in self.up(workers):
            _, local, stored = self.plan(w.worker_id, where)
            if n_prompt - local - stored <= threshold:
                return True
        return False

    # ---- the cluster's state ---------------------------------------------------------------

    def update_stats(self, stats: list[WorkerStats], now: float | None = None) -> None:
        super().update_stats(stats)
        now = time.monotonic() if now is None else now
        for s in stats:
            if s.node:
                self.nodes[s.worker_id] = s.node  # a replacement may run on another node
            self.locator.set_capacity(s.worker_id, s.total_blocks)
            busy = s.running + s.waiting > 0
            last = self._last_poll.get(s.worker_id)
            self._last_poll[s.worker_id] = (now, s.prompt_tokens, busy)
            if last is not None and last[2] and busy and s.role == "prefill":
                # Busy at both polls: what it computed in between is its prefill rate.
                self.observe_prefill(s.prompt_tokens - last[1], now - last[0])
            loads = (s.store_loaded_bytes, s.store_load_seconds)
            before = self._last_loads.get(s.worker_id)
            self._last_loads[s.worker_id] = loads
            if before is not None:  # the loads since the last poll, timed by the worker
                self.observe_load(loads[0] - before[0], loads[1] - before[1])

    def mark_up(self, worker_id: str) -> None:
        super().mark_up(worker_id)
        self.locator.forget(worker_id)
        self._pending.pop(worker_id, None)
        self._last_poll.pop(worker_id, None)
        self._last_loads.pop(worker_id, None)

    async def close(self) -> None:
        await self.locator.close()

    # ---- measurements ---------------------------------------------------------------------

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            c = self.cost
            c.prefill_tokens_per_s += c.alpha * (tokens / seconds - c.prefill_tokens_per_s)

    def observe_load(self, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            c = self.cost
            c.load_bytes_per_s += c.alpha * (num_bytes / seconds - c.load_bytes_per_s)
