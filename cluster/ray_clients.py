"""`router.workers` interfaces implemented over Ray actor handles."""

from __future__ import annotations

from collections.abc import AsyncIterator

from router.workers import DecodeClient, PrefillClient


class RayPrefillClient(PrefillClient):
    def __init__(self, handle, worker_id: str):
        self.handle = handle
        self.worker_id = worker_id

    async def prefill(self, request: dict, sink: dict) -> dict:
        return await self.handle.prefill.remote(request, sink)

    async def abort(self, request_id: str) -> bool:
        return await self.handle.abort.remote(request_id)

    async def stats(self) -> dict:
        return await self.handle.stats.remote()


class RayDecodeClient(DecodeClient):
    def __init__(self, handle, worker_id: str):
        self.handle = handle
        self.worker_id = worker_id

    async def reserve(self, request_id, num_prompt_tokens, max_tokens, lease_s) -> dict:
        return await self.handle.reserve.remote(request_id, num_prompt_tokens, max_tokens,
                                                lease_s)

    async def stream_from_prefill(self, request: dict, first: dict) -> AsyncIterator[dict]:
        gen = self.handle.generate_from_prefill.options(num_returns="streaming").remote(
            request, first)
        async for ref in gen:
            yield await ref

    async def stream_local(self, request: dict) -> AsyncIterator[dict]:
        gen = self.handle.generate.options(num_returns="streaming").remote(request)
        async for ref in gen:
            yield await ref

    async def abort(self, request_id: str) -> bool:
        return await self.handle.abort.remote(request_id)

    async def stats(self) -> dict:
        return await self.handle.stats.remote()
