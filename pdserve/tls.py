"""TLS for pdserve's listeners and clients, from PEM files the operator provides.

One small value, `TLSFiles`, says which files a side uses; it turns into gRPC server or
channel credentials, or an `ssl.SSLContext` for the HTTP API. Only paths are configured
(cluster/config.py `tls:`); the files are read where they are used, so on a multi-node
cluster each node needs them at the same paths. Nothing here holds a secret of its own.

Who uses what (docs/security.md):
- router gRPC and OpenAI HTTP ports, decode workers' KV receivers: `cert_file` + `key_file`;
  with `require_client_cert`, a peer must present a certificate chained to `ca_file`;
- clients (`PdserveClient`, `pdserve bench`, prefill workers' KV senders): `ca_file` to
  verify the server (the system's roots when unset); a KV sender under mutual TLS also
  presents `cert_file` + `key_file`; `server_name` overrides the name the server's
  certificate must carry (one certificate for every node's KV receiver).

Leaf module: standard library and grpc only (the router imports it; no torch).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    """A TLS file that cannot be used; the message names it."""


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read the TLS {what} {path!r}: {e.strerror}") from None


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM paths for one side of a TLS connection (see the module docstring)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    require_client_cert: bool = False
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TLSConfigError("a TLS certificate and its key go together: set both or "
                                 "neither")
        if self.require_client_cert and self.ca_file is None:
            raise TLSConfigError("requiring client certificates needs a CA file to check "
                                 "them against")

    def _names(self) -> str:
        return ", ".join(repr(p) for p in (self.cert_file, self.key_file, self.ca_file) if p)

    # ---- servers ---------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC listener credentials: our certificate; client certificates when required."""
        if self.cert_file is None:
            raise TLSConfigError("a TLS server needs a certificate and key")
        pair = (_read(self.key_file, "key"), _read(self.cert_file, "certificate"))
        ca = _read(self.ca_file, "CA file") if self.require_client_cert else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=self.require_client_cert)

    def server_ssl_context(self) -> ssl.SSLContext:
        """The same for an HTTP listener (aiohttp), TLS 1.2 or newer."""
        if self.cert_file is None:
            raise TLSConfigError("a TLS server needs a certificate and key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.require_client_cert:
                ctx.load_verify_locations(self.ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"cannot load TLS files {self._names()}: {e}") from None
        return ctx

    # ---- clients ---------------------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC client credentials: verify the server against `ca_file` (system roots when
        unset), presenting our own certificate when we have one (mutual TLS)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA file"),
            private_key=_read(self.key_file, "key"),
            certificate_chain=_read(self.cert_file, "certificate"))

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options: the server name to expect, when overridden."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def client_ssl_context(self) -> ssl.SSLContext:
        """An HTTPS client context that trusts `ca_file` (system roots when unset)."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file is not None:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"cannot load TLS files {self._names()}: {e}") from None
        return ctx


def secure_channel(target: str, tls: TLSFiles | None,
                   options: list | None = None) -> grpc.Channel:
    """A blocking gRPC channel to `target`: TLS when `tls` is given, plaintext otherwise."""
    options = list(options or [])
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.channel_credentials(),
                               options=options + tls.channel_options())


def secure_aio_channel(target: str, tls: TLSFiles | None,
                       options: list | None = None) -> grpc.aio.Channel:
    """The asyncio form of `secure_channel`."""
    options = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.channel_credentials(),
                                   options=options + tls.channel_options())


def add_port(server, address: str, tls: TLSFiles | None) -> int:
    """Bind a gRPC server (blocking or asyncio) to `address`, with TLS when `tls` is given;
    the bound port, 0 when binding failed."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())
