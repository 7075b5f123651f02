"""A private `redis-server` for the KV store's index: loopback, its own port, a generated
password, no persistence (the index describes memory that dies with the cluster, so a
restarted Redis starts empty and the store refills it).

`pdserve serve` starts one when the store is enabled and `kv_store.redis_url` is unset;
tests use it as a fixture, and `stop()` + `start()` again on the same port is how they
kill and bring back the index.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from urllib.parse import quote


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """One `redis-server` child process. `url` carries the password (redis://:pw@host:port)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 password: str | None = None, binary: str = "redis-server"):
        path = shutil.which(binary)
        if path is None:
            raise RedisServerError(
                f"{binary} not found: install it (scripts/setup.sh does, or apt-get install "
                "redis-server), or set kv_store.redis_url to a running Redis")
        self.binary = path
        self.host = host
        self.port = port or _free_port(host)
        self.password = password or secrets.token_urlsafe(24)
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (again, on the same port and password) and wait until it answers."""
        if self.running:
            return self
        # The password goes through stdin as a config file, not argv (visible in `ps`).
        conf = (f"bind {self.host}\nport {self.port}\nrequirepass {self.password}\n"
                "save \"\"\nappendonly no\nprotected-mode yes\ndaemonize no\n"
                "loglevel warning\nlogfile \"\"\n")
        self._proc = subprocess.Popen([self.binary, "-"], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._proc.stdin.write(conf.encode())
        self._proc.stdin.close()
        self._wait_ready(timeout)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its data is gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def _wait_ready(self, timeout: float) -> None:
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, password=self.password,
                             socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace").strip()
                    raise RedisServerError(f"redis-server exited with {self._proc.returncode}: "
                                           f"{err[-500:]}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerError(f"redis-server on port {self.port} did not answer "
                                           f"within {timeout:.0f}s")
                time.sleep(0.05)
        finally:
            client.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
