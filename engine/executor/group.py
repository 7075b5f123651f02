"""A rank group: the `torch.distributed` groups of one model replica's ranks, and the
channel on which the driver rank tells the follower ranks what to run.

Whoever places the ranks (a test spawning processes, later a Ray actor group) calls
`init_rank_group` once in each of them. Two groups are made:

- the model's group (NCCL on GPU, gloo on CPU) for the layers' all-reduce and all-gather,
  with `timeout_s` as its collective timeout;
- a gloo control group on the CPU for `ControlChannel`: the driver broadcasts each message
  as a msgpack map in a uint8 tensor (never pickle, never `broadcast_object_list`).

Where it listens: rank 0 serves the rendezvous store on exactly the host of `init_method`
(torch's own store would listen on every interface), and every rank's gloo sockets bind
`bind_host` (default: loopback when `init_method` is loopback, else torch's choice, the
address the machine's hostname resolves to). Loopback keeps a one-node group off the
network; a group whose stages span nodes binds each node's own address.

Timeouts: every collective of a step waits at most `timeout_s` for the other ranks, so a
dead or hung rank fails the step instead of hanging the group. The one wait that has no
such bound is a follower's wait for the driver's next message (a driver may be idle for
hours); a driver that dies closes its sockets, which ends that wait with an error. On
NCCL, torch's watchdog enforces the model group's timeout by tearing the process down.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgpack
import torch

from pdserve.engine.parallel import ParallelContext

DRIVER_RANK = 0
# How long a follower waits for the driver's next message: as long as the driver lives.
FOLLOWER_IDLE_TIMEOUT = datetime.timedelta(days=365)
_STATUS_BYTES = 1024  # one rank's status line in `gather_text`
# Every message goes out as one broadcast of a frame this size (an 8-byte length, then the
# body's first bytes): a decode step's input fits, so it costs one collective, not a
# length and then a body (each broadcast is a full loopback round trip under gloo).
_FRAME_BYTES = 16384
_LEN_BYTES = 8


class ControlChannel:
    """Driver -> followers messages over a gloo group: msgpack maps in uint8 tensors.

    Invariants: only the driver (group rank 0) sends; every follower receives every message
    in order. A message is one broadcast of a `_FRAME_BYTES` frame (little-endian length,
    then the body's head) plus, only for a longer body, one broadcast of the rest. Every wait
    has a timeout; a failed or timed-out broadcast raises `RuntimeError` from torch.
    """

    def __init__(self, group: Any, rank: int, world_size: int, timeout_s: float):
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)

    def send(self, msg: dict, timeout_s: float | None = None) -> None:
        self.post(msg, timeout_s).wait()

    def post(self, msg: dict, timeout_s: float | None = None) -> PostedMessage:
        """Start sending `msg` without waiting for the followers to take it (a follower
        takes the next message only when it is done with the last one); `wait()` on the
        result before relying on its delivery. Messages arrive in the order posted."""
        if self.rank != DRIVER_RANK:
            raise RuntimeError("only the driver rank sends on the control channel")
        timeout = self._timeout(timeout_s)
        body = msgpack.packb(msg, use_bin_type=True)
        head = _FRAME_BYTES - _LEN_BYTES
        frame = bytearray(_FRAME_BYTES)
        frame[:_LEN_BYTES] = len(body).to_bytes(_LEN_BYTES, "little")
        frame[_LEN_BYTES:_LEN_BYTES + min(len(body), head)] = body[:head]
        posted = PostedMessage()
        parts = [torch.frombuffer(frame, dtype=torch.uint8)]
        if len(body) > head:
            parts.append(torch.frombuffer(bytearray(body[head:]), dtype=torch.uint8))
        for t in parts:
            posted.add(self._start_broadcast(t, timeout), t)
        return posted

    def recv(self, timeout_s: float | None = None) -> dict:
        """The driver's next message (followers); waits `FOLLOWER_IDLE_TIMEOUT` by default."""
        timeout = FOLLOWER_IDLE_TIMEOUT if timeout_s is None else self._timeout(timeout_s)
        frame = torch.empty(_FRAME_BYTES, dtype=torch.uint8)
        self._broadcast(frame, timeout)
        raw = frame.numpy().tobytes()
        size = int.from_bytes(raw[:_LEN_BYTES], "little")
        head = _FRAME_BYTES - _LEN_BYTES
        body = raw[_LEN_BYTES:_LEN_BYTES + min(size, head)]
        if size > head:
            rest = torch.empty(size - head, dtype=torch.uint8)
            self._broadcast(rest, timeout)
            body += rest.numpy().tobytes()
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise ValueError("control message is not a map with an 'op'")
        return msg

    def gather_text(self, text: str, timeout_s: float | None = None) -> list[str]:
        """Every rank's status line (at most 1 KiB of UTF-8 each), in rank order.

        Each rank writes its line into its own row of a zeroed table; a sum over the ranks
        is then the table of all lines (an all-gather with the per-call timeout that
        torch's Python API offers only for all-reduce)."""
        import torch.distributed as dist

        data = text.encode()[:_STATUS_BYTES]
        table = torch.zeros(self.world_size, _STATUS_BYTES, dtype=torch.uint8)
        if data:
            table[self.rank, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        opts = dist.AllreduceOptions()
        opts.reduceOp, opts.timeout = dist.ReduceOp.SUM, self._timeout(timeout_s)
        self.group.allreduce([table], opts).wait()
        return [row.numpy().tobytes().rstrip(b"\0").decode(errors="replace") for row in table]

    def _timeout(self, timeout_s: float | None) -> datetime.timedelta:
        return self.timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)

    def _broadcast(self, t: torch.Tensor, timeout: datetime.timedelta) -> None:
        self._start_broadcast(t, timeout).wait()

    def _start_broadcast(self, t: torch.Tensor, timeout: datetime.timedelta):
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = DRIVER_RANK, 0, timeout
        return self.group.broadcast([t], opts)


class PostedMessage:
    """A control message on its way: the broadcasts carrying it (gloo runs a group's
    collectives in the order they were started), each holding its tensor until waited."""

    def __init__(self) -> None:
        self._works: list[tuple[Any, torch.Tensor]] = []

    def add(self, work, tensor: torch.Tensor) -> None:
        self._works.append((work, tensor))

    def wait(self) -> None:
        """Block until every follower took the message; raises RuntimeError from torch if
        a broadcast failed or timed out."""
        for work, _ in self._works:
            work.wait()
        self._works.clear()


@dataclass
class RankGroup:
    """This process's rank in a group of `world_size` ranks serving one model replica."""

    rank: int
    world_size: int
    device: torch.device
    parallel: ParallelContext
    control: ControlChannel
    timeout_s: float

    @property
    def is_driver(self) -> bool:
        return self.rank == DRIVER_RANK

    def destroy(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def init_rank_group(rank: int, world_size: int, init_method: str, device: str = "cpu",
                    timeout_s: float = 60.0, pp_size: int = 1,
                    bind_host: str | None = None) -> RankGroup:
    """Join the group (every rank calls this with the same `init_method`,
    `tcp://HOST:PORT`: rank 0 listens there). `device` is this rank's own device ("cuda:1"
    for rank 1 on a multi-GPU host). `bind_host` is the address this rank's gloo sockets
    listen on (see the module docstring). The ranks form `pp_size` pipeline stages of
    `world_size / pp_size` tensor-parallel ranks each, numbered stage-major
    (`ParallelContext.rank`); each stage's ranks get their own TP group."""
    import torch.distributed as dist

    dev = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    host, port = _tcp_address(init_method)
    if bind_host is None and _is_loopback(host):
        bind_host = host
    if bind_host is not None:
        # Read by every gloo group this process makes from now on (the model's, the
        # control channel, the stages'); this process is one rank and nothing else.
        os.environ["GLOO_SOCKET_IFNAME"] = interface_of(bind_host)
    store = _rendezvous_store(rank, world_size, host, port, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    if world_size % pp_size:
        raise ValueError(f"{world_size} ranks do not form {pp_size} equal pipeline stages")
    tp = world_size // pp_size
    tp_group = dist.group.WORLD
    if pp_size > 1:
        # Every rank creates every stage's group, in the same order (a collective call).
        stages = [dist.new_group(list(range(s * tp, (s + 1) * tp)), timeout=timeout)
                  for s in range(pp_size)]
        tp_group = stages[rank // tp]
    parallel = ParallelContext(tp_rank=rank % tp, tp_size=tp, pp_rank=rank // tp,
                               pp_size=pp_size, tp_group=tp_group)
    return RankGroup(rank, world_size, dev, parallel,
                     ControlChannel(control, rank, world_size, timeout_s), timeout_s)


def _tcp_address(init_method: str) -> tuple[str, int]:
    parts = urlsplit(init_method)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise ValueError(f"a rank group's init_method is tcp://HOST:PORT, got {init_method!r}")
    return parts.hostname, parts.port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _rendezvous_store(rank: int, world_size: int, host: str, port: int,
                      timeout: datetime.timedelta):
    """The group's TCP store; rank 0 serves it on `host` only, from a socket it bound
    itself (the store's own listener binds every interface)."""
    import torch.distributed as dist

    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(world_size * 4)
    except OSError:
        sock.close()
        raise
    # The store owns the descriptor from here on (and closes it with itself).
    return dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def interface_of(address: str) -> str:
    """The name of this machine's network interface that holds `address` (what gloo binds
    by: `GLOO_SOCKET_IFNAME`). ValueError if none does."""
    import psutil

    want = "127.0.0.1" if address == "localhost" else address
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == want for a in addrs):
            return name
    raise ValueError(f"no network interface of this machine has the address {address!r}")
