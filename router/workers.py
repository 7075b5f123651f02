"""How the router talks to workers: two small async interfaces, implemented over Ray in
`cluster.ray_clients` (and by anything else that can carry plain data).

Every argument and answer is a `pdserve.messages` message (or a plain scalar). An
implementation that crosses a process boundary converts them with their `to_dict` /
`from_dict` at its edge, so no transport between router and workers needs pickle for our
data; the router itself never sees the plain form.

A call to a worker whose process is gone raises `WorkerDown`, never the carrier's own error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest, WorkerStats


class WorkerBusy(RuntimeError):
    """The worker is healthy but has no room now (e.g. no free KV blocks); try later."""


class WorkerDown(RuntimeError):
    """The worker's process died or stopped answering: whatever it held is lost. The
    router stops routing to it until the supervisor replaced it (`cluster.supervisor`)."""

    def __init__(self, worker_id: str, message: str):
        super().__init__(message)
        self.worker_id = worker_id


class WorkerClient(ABC):
    worker_id: str

    @abstractmethod
    async def stats(self) -> WorkerStats:
        """Free/total blocks, running and waiting requests, token and handoff counters."""

    @abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Abort the request here if present; frees its blocks. Idempotent."""


class PrefillClient(WorkerClient):
    @abstractmethod
    async def prefill(self, request: WorkerRequest, sink: KVSink) -> PrefillResult:
        """Prefill and hand the KV to `sink`; returns the first token once the decode side
        acknowledged every layer. Raises on a failed handoff (this side's blocks are freed;
        the caller aborts the reservation)."""


class DecodeClient(WorkerClient):
    @abstractmethod
    async def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int,
                      lease_s: float, prompt_token_ids: list[int] | None = None) -> KVSink:
        """Allocate the prompt's blocks under a lease; returns the sink. With
        `prompt_token_ids` the worker reuses the prefix it has cached: the sink then starts
        past it (`first_block`) and the prefill worker sends only the rest. Raises
        WorkerBusy when there are not enough free blocks right now (nothing was allocated)."""

    @abstractmethod
    async def renew(self, request_id: str, lease_s: float) -> bool:
        """Extend an uncommitted reservation's lease to `lease_s` from now; False if it is
        gone (aborted or expired)."""

    @abstractmethod
    def stream_from_prefill(self, request: WorkerRequest, first: PrefillResult
                            ) -> AsyncIterator[OutputChunk]:
        """Commit a handed-off request and stream its output chunks, the first token's
        first. Raises (having freed the reservation) if the KV did not fully arrive."""

    @abstractmethod
    def stream_local(self, request: WorkerRequest) -> AsyncIterator[OutputChunk]:
        """Prefill and decode on this worker (colocated / short prompts)."""
