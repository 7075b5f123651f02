"""Helpers for checking `pdserve serve` from outside, as an operator would: start it as a
subprocess, find every process it started, their listening sockets, and whether any is
still alive after the server is gone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil

from pdserve.cluster.local_ray import is_loopback
from pdserve.cluster.reaper import TAG_ENV, tagged_processes


@dataclass
class Served:
    proc: subprocess.Popen
    grpc_address: str
    http_url: str


def start_serve(config_path, timeout: float = 600.0) -> Served:
    """`python -m pdserve.cluster serve CONFIG` on free ports, in its own session; returns
    once it prints both addresses. Its output keeps being read (a full pipe would block
    the server's logging)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cluster", "serve", str(config_path), "--port", "0",
         "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    grpc_address = http_url = None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if m := re.search(r"serving on (\S+:\d+)", line):
            grpc_address = m.group(1)
        if m := re.search(r"OpenAI-compatible HTTP API on (http://\S+:\d+)/v1", line):
            http_url = m.group(1)
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not start")
    if not (grpc_address and http_url):
        proc.kill()
        raise AssertionError("the server exited before serving")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return Served(proc, grpc_address, http_url)


def started_by(pid: int) -> list[psutil.Process]:
    """Every live process the server `pid` started: its descendants, and every process
    carrying its reaper tag (found through a descendant's environment: a Ray process that
    left the tree would still carry it)."""
    found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    tags = set()
    for p in found.values():
        try:
            tags.add(p.environ().get(TAG_ENV))
        except psutil.Error:
            continue
    tags.discard(None)
    assert len(tags) == 1, f"expected one reaper tag among the server's processes: {tags}"
    for p in tagged_processes(tags.pop()):
        found.setdefault(p.pid, p)
    return list(found.values())


def name(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
        return cmd[:120] or p.name()
    except psutil.Error:
        return "?"


def listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process, ip, port) of every listening TCP socket and bound UDP socket."""
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            tcp_listen = c.type == 1 and c.status == psutil.CONN_LISTEN  # SOCK_STREAM
            udp_bound = c.type == 2 and c.laddr  # SOCK_DGRAM
            if tcp_listen or udp_bound:
                out.append((name(p), c.laddr.ip, c.laddr.port))
    return out


def off_loopback(sockets: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [s for s in sockets if not is_loopback(s[1])]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def assert_all_gone(procs: list[psutil.Process], within: float) -> float:
    """Wait up to `within` seconds for every one of `procs` to end; returns how long it
    took. On failure, kills the survivors (so one failure does not leak into other tests)
    and names them."""
    start = time.monotonic()
    while (left := alive(procs)) and time.monotonic() - start < within:
        time.sleep(0.2)
    if left:
        names = [(p.pid, name(p)) for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        raise AssertionError(f"alive {within:.0f}s after the server: {names}")
    return time.monotonic() - start
