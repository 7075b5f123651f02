"""A small synchronous Python client for the pdserve gRPC API.

    from pdserve.cluster.client import PdserveClient
    with PdserveClient("127.0.0.1:50051") as c:
        for piece in c.stream("Tell me a joke", max_tokens=32):
            print(piece.text, end="", flush=True)

Against a router serving TLS (config `tls:`), pass `tls=True` to verify it with the system's
roots, or `ca_file=` the CA certificate that signed the router's certificate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pdserve.proto import pb, pb_grpc
from pdserve.tls import TLSFiles, secure_channel


class PdserveClient:
    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None,
                 timeout: float | None = 600.0, ca_file: str | None = None,
                 tls: bool = False):
        secure = tls or ca_file is not None
        self.channel = secure_channel(target, TLSFiles(ca_file=ca_file) if secure else None)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout

    def __enter__(self) -> PdserveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def request(prompt: str | Sequence[dict] | Sequence[int], request_id: str = "",
                **sampling) -> pb.GenerateRequest:
        """Build a GenerateRequest from text, chat messages or token ids + sampling fields."""
        req = pb.GenerateRequest(request_id=request_id)
        if isinstance(prompt, str):
            req.prompt = prompt
        elif prompt and isinstance(prompt[0], dict):
            req.messages.messages.extend(pb.ChatMessage(**m) for m in prompt)
        else:
            req.prompt_token_ids.ids.extend(prompt)
        stop = sampling.pop("stop", None)
        stop_ids = sampling.pop("stop_token_ids", None)
        req.sampling.CopyFrom(pb.SamplingParams(**sampling))
        if stop:
            req.sampling.stop.extend([stop] if isinstance(stop, str) else stop)
        if stop_ids:
            req.sampling.stop_token_ids.extend(stop_ids)
        return req

    def stream(self, prompt, request_id: str = "", **sampling) -> Iterator[pb.GenerateResponse]:
        """Yield responses as they arrive; closing the iterator cancels the request."""
        call = self.generation.Generate(self.request(prompt, request_id, **sampling),
                                        timeout=self.timeout, metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, prompt, **sampling) -> dict:
        """The whole answer: text, token ids, finish reason and usage."""
        text, ids, last = [], [], None
        for r in self.stream(prompt, **sampling):
            text.append(r.text)
            ids.extend(r.token_ids)
            last = r
        return {"text": "".join(text), "token_ids": ids,
                "finish_reason": last.finish_reason if last else "",
                "usage": last.usage if last else None}

    def stats(self) -> pb.StatsResponse:
        return self.admin.Stats(pb.StatsRequest(), timeout=30, metadata=self.metadata)

    def health(self) -> pb.HealthResponse:
        return self.generation.Health(pb.HealthRequest(), timeout=30, metadata=self.metadata)
