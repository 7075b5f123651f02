"""The host channel of the `nccl` transport: announces and their replies over TCP + msgpack.

Each message is a 4-byte big-endian length and a msgpack map (never pickle: DESIGN.md).
The decode side runs one `ControlServer` (loopback unless the config names an interface);
each prefill-side pair holds one `ControlClient` connection and writes one announce at a
time, so the decode side sees a pair's announces in the order the prefill side queued them
and answers them in that order.

Why a plain socket rather than a gRPC unary call: the announce sits on the time to first
token of every request whose first layer is ready before the announce is written; a
loopback write costs tens of microseconds, a Python gRPC round trip several hundred. A
frame larger than `MAX_FRAME` or a message that is not a msgpack map closes the connection.

`ControlClient.send_nowait` writes a frame from any thread without blocking (the socket is
in timeout mode, so its descriptor is non-blocking at the OS level): the prefill side writes
an announce from the thread that opened the transfer, with no hand-off to another thread
(which, under the GIL, can wait for the forward pass's next blocking call).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import msgpack

log = logging.getLogger("pdserve.kv.nccl")

MAX_FRAME = 4 << 20  # an announce of 100k block ids is ~500 KB
_LEN = struct.Struct(">I")


class ControlError(OSError):
    """The host channel failed: refused, cut off, timed out, or out of step."""


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ControlError("connection closed by the peer")
        buf += chunk
    return bytes(buf)


def encode_msg(msg: dict[str, Any]) -> bytes:
    """One frame: the 4-byte length and the msgpack body."""
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(encode_msg(msg))


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ControlError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        msg = msgpack.unpackb(_recv_exact(sock, n), raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise ControlError(f"malformed control frame: {e}") from None
    if not isinstance(msg, dict):
        raise ControlError(f"control frame is a {type(msg).__name__}, not a map")
    return msg


class ControlServer:
    """Listens on `host:port` (a free port by default) and answers each message with
    `handle(msg) -> reply`, one thread per connection (one connection per prefill worker)."""

    def __init__(self, handle: Callable[[dict[str, Any]], dict[str, Any]],
                 host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 name: str = "kv-nccl-ctl") -> None:
        self._handle = handle
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host.strip("[]"), port), family=family)
        except OSError as e:
            raise OSError(f"cannot listen for KV announces on {host}:{port}: {e}") from None
        self.address = host_port(advertise_host or host, self._sock.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._name = name
        threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self._name}-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                send_msg(conn, self._handle(recv_msg(conn)))
        except OSError:
            pass  # the peer went away, sent junk, or we closed
        except Exception:  # noqa: BLE001 - a handler bug must not take the listener down
            log.exception("KV announce handler")
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        self._sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class ControlClient:
    """One connection to a decode worker's `ControlServer`.

    `send`, `send_bytes` and `recv` are for one thread at a time; `send_nowait` may be called
    from another thread meanwhile (it never blocks), and `close` from any thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._nowait = False  # the descriptor is non-blocking: `send_nowait` may write
        self._lock = threading.Lock()  # `close` against `send_nowait`: no write to a reused fd

    def connected_to(self, address: str) -> bool:
        return self._sock is not None and self.address == address

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send `msg` and return the reply (see `send` and `recv`)."""
        self.send(msg, timeout)
        return self.recv(timeout)

    def send(self, msg: dict[str, Any], timeout: float) -> None:
        """Write `msg` (connecting first if needed); once this returns, the peer will read
        it unless the connection breaks. `ControlError` on any failure."""
        try:
            data = encode_msg(msg)
        except (TypeError, ValueError) as e:
            raise ControlError(f"KV announce channel to {self.address}: {e}") from None
        self.send_bytes(data, timeout)

    def send_bytes(self, data: bytes, timeout: float) -> None:
        """Write frames already encoded (`encode_msg`), connecting first if needed."""
        try:
            if self._sock is None:
                host, port = split_host_port(self.address)
                sock = socket.create_connection((host, port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self._sock = sock
                    # Timeout mode keeps the descriptor non-blocking (documented CPython
                    # behaviour); checked rather than assumed.
                    self._nowait = not os.get_blocking(sock.fileno())
            self._sock.settimeout(max(timeout, 1e-3))
            self._sock.sendall(data)
        except (OSError, ValueError) as e:
            self.close()
            raise ControlError(f"KV announce channel to {self.address}: {e}") from None

    def send_nowait(self, data: bytes) -> int:
        """Write what the socket takes of `data` now, without blocking: the byte count, 0
        when not connected or the socket's buffer is full. A caller that got less than
        `len(data)` must write the rest (`send_bytes`) before any other frame.
        `ControlError` if the connection failed (it is then closed)."""
        with self._lock:
            if self._sock is None or not self._nowait:
                return 0
            try:
                return os.write(self._sock.fileno(), data)
            except BlockingIOError:
                return 0
            except OSError as e:
                err = e
        self.close()
        raise ControlError(f"KV announce channel to {self.address}: {err}")

    def recv(self, timeout: float) -> dict[str, Any]:
        """The next reply; `ControlError` on any failure (the connection is then dropped,
        and the caller cannot know whether the peer acted on what it sent)."""
        sock = self._sock
        if sock is None:
            raise ControlError(f"KV announce channel to {self.address}: not connected")
        try:
            sock.settimeout(max(timeout, 1e-3))
            return recv_msg(sock)
        except OSError as e:
            self.close()
            raise ControlError(f"KV announce channel to {self.address}: {e}") from None

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
