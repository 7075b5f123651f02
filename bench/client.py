"""An async gRPC client for ``pdserve.v1.Generation`` that records what it sees.

One channel carries every request (HTTP/2 multiplexes the streams). Timestamps are taken
with ``time.perf_counter()`` as each streamed response is handed to us, so they include
the network and the client's own event loop, as a user's would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from pdserve.bench.records import RequestRecord
from pdserve.bench.workloads import RequestSpec
from pdserve.proto import pb, pb_grpc
from pdserve.tls import TLSFiles, secure_aio_channel


class ServerUnreachable(ConnectionError):
    """The benchmark target could not be reached or refused us before any request ran."""


def build_request(
    spec: RequestSpec,
    request_id: str,
    *,
    force_output_len: bool = True,
    temperature: float = 0.0,
    seed: int | None = None,
) -> pb.GenerateRequest:
    """The ``GenerateRequest`` for ``spec``.

    Forcing the output length sets ``min_tokens = max_tokens`` and ``ignore_eos`` so every
    request generates exactly what the workload asked for; otherwise an early EOS would make
    two configs do different amounts of work under the same workload.
    """
    sampling = pb.SamplingParams(max_tokens=spec.output_len, temperature=temperature)
    if force_output_len:
        sampling.min_tokens = spec.output_len
        sampling.ignore_eos = True
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if spec.prompt_token_ids is not None:
        request.prompt_token_ids.ids.extend(spec.prompt_token_ids)
    elif spec.messages is not None:
        for role, content in spec.messages:
            request.messages.messages.add(role=role, content=content)
    elif spec.prompt is not None:
        request.prompt = spec.prompt
    else:
        raise ValueError(f"request {request_id} has no input")
    return request


class GenerationClient:
    """Sends workload requests to one target and turns each stream into a RequestRecord."""

    def __init__(
        self,
        target: str,
        *,
        request_timeout: float = 300.0,
        force_output_len: bool = True,
        temperature: float = 0.0,
        api_key: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.target = target
        self.request_timeout = request_timeout
        self.force_output_len = force_output_len
        self.temperature = temperature
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        # TLS when a CA is given (the router's `tls:` config), plaintext otherwise.
        self._channel = secure_aio_channel(
            target, TLSFiles(ca_file=ca_file) if ca_file is not None else None)
        self._stub = pb_grpc.GenerationStub(self._channel)

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self._channel.close()

    async def connect(self, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until the channel is ready, then ask ``Health``; returns what it reported.

        Raises ServerUnreachable when the connection fails or does not come up within
        ``timeout`` seconds, or when the server says it is not serving. A server without a
        Health method is accepted (an empty dict comes back).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        state = self._channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            remaining = deadline - loop.time()
            # A refused connection shows as TRANSIENT_FAILURE at once: fail fast on it.
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE or remaining <= 0:
                raise ServerUnreachable(f"cannot connect to pdserve at {self.target}")
            try:
                await asyncio.wait_for(self._channel.wait_for_state_change(state), remaining)
            except TimeoutError:
                raise ServerUnreachable(
                    f"cannot connect to pdserve at {self.target} within {timeout:g}s"
                ) from None
            state = self._channel.get_state(try_to_connect=True)
        try:
            health = await self._stub.Health(
                pb.HealthRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return {}
            raise ServerUnreachable(
                f"{self.target} refused Health: {exc.code().name}: {exc.details()}"
            ) from None
        if not health.serving:
            raise ServerUnreachable(f"pdserve at {self.target} reports it is not serving")
        return {
            "mode": health.mode,
            "prefill_workers": health.prefill_workers,
            "decode_workers": health.decode_workers,
        }

    async def generate(
        self, spec: RequestSpec, request_id: str, seed: int | None = None
    ) -> RequestRecord:
        """Send one request and record its stream. RPC errors end up in ``record.error``."""
        request = build_request(
            spec,
            request_id,
            force_output_len=self.force_output_len,
            temperature=self.temperature,
            seed=seed,
        )
        record = RequestRecord(request_id, spec.input_len, spec.output_len, tag=spec.tag)
        record.send_time = time.perf_counter()
        call = self._stub.Generate(request, timeout=self.request_timeout, metadata=self._metadata)
        try:
            async for response in call:
                record.add_chunk(time.perf_counter(), len(response.token_ids))
                if response.finish_reason:
                    record.finish_reason = response.finish_reason
                if response.HasField("usage"):
                    record.prompt_tokens = response.usage.prompt_tokens
                    record.completion_tokens = response.usage.completion_tokens
                    record.cached_tokens = response.usage.cached_tokens
            record.end_time = time.perf_counter()
            if record.first_token_time is None:
                record.error = "stream ended without a token"
        except grpc.aio.AioRpcError as exc:
            record.end_time = time.perf_counter()
            record.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            call.cancel()
            raise
        return record
