"""Run a whole cluster (actors + gRPC router) in the background of this process.

Used by tests and scripts that need a real cluster and its address without a subprocess:

    with BackgroundCluster(parse_config({...})) as c:
        client = PdserveClient(c.address)
"""

from __future__ import annotations

import asyncio
import threading

from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.launcher import Cluster, run_router


class BackgroundCluster:
    def __init__(self, config: ClusterConfig, ready_timeout: float = 600.0):
        self.config = config
        self.cluster = Cluster(config)
        self.ready_timeout = ready_timeout
        self.address: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def http_url(self) -> str | None:
        """Base URL of the OpenAI HTTP API (e.g. http://127.0.0.1:8000), None when off."""
        return self.cluster.http_url

    def on_router(self, coro, timeout: float = 30.0):
        """Run `coro` on the router's event loop (where its policy and locator live) and
        return its result: how tests ask the running router where a prompt is cached."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> BackgroundCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self.cluster.start(self.ready_timeout)
            self._thread = threading.Thread(target=self._serve, name="router", daemon=True)
            self._thread.start()
            self._ready.wait(120)
            if self._error is not None:
                raise self._error
            if self.address is None:
                raise TimeoutError("router did not start within 120 s")
        except BaseException:
            self.stop()
            raise

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(address: str) -> None:
                self.address = address
                self._ready.set()

            await run_router(self.cluster, self._stop, on_ready=ready)

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced to start()
            self._error = e
            self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
        self.cluster.shutdown()
