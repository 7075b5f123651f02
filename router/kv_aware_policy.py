"""KV-aware routing: send a prompt to the prefill worker with the lowest expected time to
first token, counting what each could reuse.

For worker w and a prompt of n tokens:

    ttft(w) = queue(w) + prefill(n - local(w) - store(w)) + load(store(w))

- `local(w)`: tokens of the prompt's prefix in w's own prefix cache (free to reuse);
- `store(w)`: tokens after that which the global KV store holds on w's node (copied from
  the node's pool at the measured load bandwidth);
- `queue(w)`: the uncached prompt tokens already routed to w and not prefilled yet, at the
  measured prefill rate;
- `prefill(k)`: k tokens at the measured prefill rate.

Where a prefix lives comes from a `PrefixLocator` (the store index and the workers' cache
events); rates start at the configured figures and follow measurements (`observe_*`).
Ties go to the least-loaded rule of `RoutingPolicy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.router.policy import RoutingPolicy


class PrefixLocator(ABC):
    """Where a prompt's prefix is cached. Answers in tokens, whole blocks only.

    Invariant: `store_tokens(node, ids, after)` counts only tokens past the first `after`
    (what the worker holds itself), so the two never count a token twice."""

    @abstractmethod
    def local_tokens(self, worker_id: str, token_ids: Sequence[int]) -> int:
        """Tokens of the prompt's prefix in `worker_id`'s own prefix cache."""

    @abstractmethod
    def store_tokens(self, node: str, token_ids: Sequence[int], after: int) -> int:
        """Tokens after the first `after` of the prompt's prefix in `node`'s store pool."""


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

    Invariant (besides the base class's): `pending_tokens[w]` is the sum of the uncached
    tokens of the requests routed to `w` whose prefill has not returned, in routing order,
    so it returns to 0 when `w` is idle.
    """

    def __init__(self, block_size: int, locator: PrefixLocator, nodes: dict[str, str],
                 cost: CostModel | None = None, conditional_tokens: int = 0):
        super().__init__(block_size)
        self.locator = locator
        self.nodes = dict(nodes)  # worker id -> node id
        self.cost = cost or CostModel()
        self.conditional_tokens = conditional_tokens
        self._pending: dict[str, deque[int]] = {}

    def pending_tokens(self, worker_id: str) -> int:
        return sum(self._pending.get(worker_id, ()))

    def plan(self, worker_id: str, token_ids: Sequence[int]) -> tuple[float, int, int]:
        """(expected TTFT in seconds, tokens reused locally, tokens loaded from the store)."""
        n = len(token_ids)
        local = min(self.locator.local_tokens(worker_id, token_ids), n - 1)
        node = self.nodes.get(worker_id)
        stored = 0
        if node is not None:
            stored = min(self.locator.store_tokens(node, token_ids, local), n - 1 - local)
        uncached = n - local - stored
        ttft = (self.cost.prefill_s(self.pending_tokens(worker_id) + uncached)
                + self.cost.load_s(stored))
        return ttft, local, stored

    def pick_prefill(self, workers, exclude=frozenset(), token_ids: Sequence[int] | None = None):
        if token_ids is None:
            return super().pick_prefill(workers, exclude)
        pool = [w for w in workers if w.worker_id not in exclude] or workers
        turn = next(self._tie_prefill)
        plans = {w.worker_id: self.plan(w.worker_id, token_ids) for w in pool}
        best = min(pool, key=lambda w: (round(plans[w.worker_id][0], 6),
                                        self.in_flight.get(w.worker_id, 0),
                                        (pool.index(w) - turn) % len(pool)))
        _, local, stored = plans[best.worker_id]
        self._pending.setdefault(best.worker_id, deque()).append(
            len(token_ids) - local - stored)
        return best

    def on_prefill_done(self, p) -> None:
        super().on_prefill_done(p)
        q = self._pending.get(p.worker_id)
        if q:
            q.popleft()

    def prefill_on_decode(self, decode_worker_id: str, token_ids: Sequence[int]) -> bool:
        """Conditional disaggregation: True when what the decode worker would still have to
        compute itself (after its own cache and its node's store) is at most
        `conditional_tokens`, so a handoff would cost more than it saves."""
        _, local, stored = self.plan(decode_worker_id, token_ids)
        return len(token_ids) - local - stored <= self.conditional_tokens

    # ---- measurements ---------------------------------------------------------------------

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            c = self.cost
            c.prefill_tokens_per_s += c.alpha * (tokens / seconds - c.prefill_tokens_per_s)

    def observe_load(self, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            c = self.cost
            c.load_bytes_per_s += c.alpha * (num_bytes / seconds - c.load_bytes_per_s)
