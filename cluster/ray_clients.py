"""`router.workers` interfaces implemented over Ray actor handles.

A worker's exception reaches the caller as a `RayTaskError` whose text is the whole remote
traceback (with terminal colour codes). The router turns exception text into the status
message a client reads, so every call here re-raises the worker's own exception instead:
the client sees "injected transfer failure for req-1", not a stack trace of our files.

Messages go out with `to_dict` and come back through `from_dict` (`pdserve.messages`):
Ray carries plain data only. A dead actor raises `WorkerDown` naming the worker.

`handle` is replaced in place when the supervisor starts a new actor for the same worker
(`cluster.supervisor`): calls made after that go to the new process.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError, RayTaskError

from pdserve.engine.kv_cache.block_manager import OutOfBlocksError
from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest, WorkerStats
from pdserve.router.workers import DecodeClient, PrefillClient, WorkerBusy, WorkerDown


def _worker_error(e: RayTaskError) -> Exception:
    """The exception the worker raised (Ray keeps it as `cause`)."""
    if isinstance(e.cause, OutOfBlocksError):
        return WorkerBusy(str(e.cause))
    if isinstance(e.cause, Exception):
        return e.cause
    return RuntimeError(f"{e.function_name} failed")


def _down(worker_id: str, e: RayActorError) -> WorkerDown:
    """A dead (or unreachable) actor, said in one line: Ray's own text is a paragraph about
    its internals, with the actor's address and a traceback."""
    return WorkerDown(worker_id, f"worker {worker_id} is down (its process died or became "
                                 f"unreachable: {type(e).__name__})")


def _raises_worker_errors(method):
    @functools.wraps(method)
    async def call(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except RayActorError as e:
            raise _down(self.worker_id, e) from None
        except RayTaskError as e:
            raise _worker_error(e) from e

    return call


class RayPrefillClient(PrefillClient):
    def __init__(self, handle, worker_id: str):
        self.handle = handle
        self.worker_id = worker_id

    @_raises_worker_errors
    async def prefill(self, request: WorkerRequest, sink: KVSink) -> PrefillResult:
        return PrefillResult.from_dict(
            await self.handle.prefill.remote(request.to_dict(), sink.to_dict()))

    @_raises_worker_errors
    async def abort(self, request_id: str) -> bool:
        return await self.handle.abort.remote(request_id)

    @_raises_worker_errors
    async def stats(self) -> WorkerStats:
        return WorkerStats.from_dict(await self.handle.stats.remote())


class RayDecodeClient(DecodeClient):
    def __init__(self, handle, worker_id: str):
        self.handle = handle
        self.worker_id = worker_id

    @_raises_worker_errors
    async def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int,
                      lease_s: float, prompt_token_ids: list[int] | None = None) -> KVSink:
        return KVSink.from_dict(await self.handle.reserve.remote(
            request_id, num_prompt_tokens, max_tokens, lease_s, prompt_token_ids))

    @_raises_worker_errors
    async def renew(self, request_id: str, lease_s: float) -> bool:
        return await self.handle.renew.remote(request_id, lease_s)

    def stream_from_prefill(self, request: WorkerRequest, first: PrefillResult
                            ) -> AsyncIterator[OutputChunk]:
        return _stream(self.worker_id, self.handle.generate_from_prefill, request.to_dict(),
                       first.to_dict())

    def stream_local(self, request: WorkerRequest) -> AsyncIterator[OutputChunk]:
        return _stream(self.worker_id, self.handle.generate, request.to_dict())

    @_raises_worker_errors
    async def abort(self, request_id: str) -> bool:
        return await self.handle.abort.remote(request_id)

    @_raises_worker_errors
    async def stats(self) -> WorkerStats:
        return WorkerStats.from_dict(await self.handle.stats.remote())


async def _stream(worker_id: str, method, *args) -> AsyncIterator[OutputChunk]:
    """Chunks of a generator actor method, consumed as a Ray streaming generator."""
    gen = method.options(num_returns="streaming").remote(*args)
    try:
        async for ref in gen:
            yield OutputChunk.from_dict(await ref)
    except RayActorError as e:
        raise _down(worker_id, e) from None
    except RayTaskError as e:
        raise _worker_error(e) from e
