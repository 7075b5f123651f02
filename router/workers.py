"""How the router talks to workers: two small async interfaces, implemented over Ray in
`cluster.ray_clients` (and by anything else that can carry plain dicts).

Every payload is a plain dict of JSON types (request: request_id, prompt_token_ids, params;
sink: kv_transfer.KVSink.to_dict(); chunks: token_ids, text, logprobs, finished, ...), so
no transport between router and workers needs pickle for our data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator


class WorkerBusy(RuntimeError):
    """The worker is healthy but has no room now (e.g. no free KV blocks); try later."""


class WorkerClient(ABC):
    worker_id: str

    @abstractmethod
    async def stats(self) -> dict:
        """free_blocks, total_blocks, running, waiting, prompt/generated token counts."""

    @abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Abort the request here if present; frees its blocks. Idempotent."""


class PrefillClient(WorkerClient):
    @abstractmethod
    async def prefill(self, request: dict, sink: dict) -> dict:
        """Prefill and hand the KV to `sink`; returns the first token (token_id, logprob,
        top_logprobs, finish_reason, cached_tokens). Raises on a failed handoff."""


class DecodeClient(WorkerClient):
    @abstractmethod
    async def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int,
                      lease_s: float, prompt_token_ids: list[int] | None = None) -> dict:
        """Allocate the prompt's blocks under a lease; returns the sink dict. With
        `prompt_token_ids` the worker reuses the prefix it has cached: the sink then starts
        past it (`first_block`) and the prefill worker sends only the rest. Raises
        WorkerBusy when there are not enough free blocks right now."""

    @abstractmethod
    def stream_from_prefill(self, request: dict, first: dict) -> AsyncIterator[dict]:
        """Commit a handed-off request and stream its output chunks."""

    @abstractmethod
    def stream_local(self, request: dict) -> AsyncIterator[dict]:
        """Prefill and decode on this worker (colocated / short prompts)."""
