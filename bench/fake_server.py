"""A stand-in ``pdserve.v1.Generation`` server that streams tokens at a set pace.

It runs no model: it waits ``ttft`` seconds, then streams ``max_tokens`` token ids, ``chunk``
per response, ``itl`` seconds per token apart. The benchmark's own tests use it (so they
know exactly what TTFT and ITL to expect), and ``python -m pdserve.bench.fake_server`` lets anyone
try the benchmark, or ``--compare``, without a cluster: like the cluster it prints
``serving on HOST:PORT`` when ready and exits cleanly on SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import threading
from dataclasses import dataclass

import grpc

from pdserve.proto import pb, pb_grpc
from pdserve.tls import TLSFiles, add_port


@dataclass(frozen=True, slots=True)
class Pace:
    """How the fake server streams: seconds to the first token, per later token, and tokens
    per response. ``fail_every`` k > 0 fails every k-th request with INTERNAL after its first
    token, to exercise failure accounting."""

    ttft: float = 0.05
    itl: float = 0.01
    chunk: int = 1
    fail_every: int = 0


class FakeGeneration(pb_grpc.GenerationServicer):
    """The servicer; prompt length is the token-id count, or whitespace words for text."""

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self._count = itertools.count(1)

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        number = next(self._count)
        sampling = request.sampling
        total = sampling.max_tokens if sampling.HasField("max_tokens") else 16
        which = request.WhichOneof("input")
        if which == "prompt_token_ids":
            prompt_tokens = len(request.prompt_token_ids.ids)
        elif which == "messages":
            prompt_tokens = sum(len(m.content.split()) for m in request.messages.messages)
        else:
            prompt_tokens = len(request.prompt.split())
        await asyncio.sleep(self.pace.ttft)
        sent, first = 0, True
        while sent < total:
            if not first:
                await asyncio.sleep(self.pace.itl * min(self.pace.chunk, total - sent))
            n = 1 if first else min(self.pace.chunk, total - sent)
            first = False
            ids = list(range(sent, sent + n))
            sent += n
            response = pb.GenerateResponse(request_id=request.request_id, token_ids=ids)
            if sent == total:
                response.finish_reason = "length"
                response.usage.CopyFrom(
                    pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=total)
                )
            yield response
            if self.pace.fail_every and number % self.pace.fail_every == 0:
                await context.abort(grpc.StatusCode.INTERNAL, "fake failure")

    async def Health(self, request, context):  # noqa: N802
        return pb.HealthResponse(serving=True, prefill_workers=0, decode_workers=0, mode="fake")


async def start(pace: Pace, host: str = "127.0.0.1", port: int = 0,
                tls: TLSFiles | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a fake server on the running loop (TLS with `tls`); returns it and the bound
    port."""
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(FakeGeneration(pace), server)
    bound = add_port(server, f"{host}:{port}", tls)
    await server.start()
    return server, bound


class FakeServerThread:
    """A fake server on its own event loop in a background thread (for synchronous callers).

    ``with FakeServerThread(pace) as target:`` gives ``127.0.0.1:PORT``.
    """

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def __enter__(self) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(self.pace), self._loop)
        self._server, port = future.result(timeout=10)
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _serve(pace: Pace, host: str, port: int) -> None:
    server, bound = await start(pace, host, port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    print(f"fake pdserve serving on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(1.0)
    print("fake pdserve stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT."""
    parser = argparse.ArgumentParser(description="A fake pdserve Generation server.")
    parser.add_argument(
        "config", nargs="?", help="ignored (accepted so it can stand in for a cluster)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--itl", type=float, default=0.01)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--fail-every", type=int, default=0)
    args = parser.parse_args(argv)
    pace = Pace(args.ttft, args.itl, args.chunk, args.fail_every)
    asyncio.run(_serve(pace, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
