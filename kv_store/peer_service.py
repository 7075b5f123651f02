"""Cross-node pulls of the global KV store: a node's store process serves reads of its
pool's slots over gRPC (`PeerReadService`), and a worker whose own node's pool lacks a
prefix that another node's pool holds copies those blocks into its own node's pool
(`PeerPuller`), from where the ordinary local load (kv_store/connector.py) serves them.

Admission: every read carries the cluster's store secret, which the launcher generates at
start and hands to the store processes and the workers as Ray actor arguments (never a
file); the service compares it in constant time before it looks at anything else and
refuses a wrong one with PERMISSION_DENIED, pinning and reading nothing. With the config's
`tls:` section the service listens with TLS (mutual under `tls.mutual_kv`) and pullers
verify it, as the grpc KV transport does.

Soundness is pool.py's seqlock, held across the network: the service pins the requested
prefix in the index, checks each slot's header (and CRC with `verify: crc`) against the
hash and generation the index gave, copies the slot's bytes and reads the header again
before it sends them; the first block that fails a check ends the stream. The puller takes
only the leading run of blocks whose hashes are the ones it asked for, in order, of the
right size, and writes them through the index like a save (alloc, write, commit): a pull
that fails anywhere is a shorter prefix or none — a miss, never wrong KV.

Pulls run on the worker actor's request thread before the request reaches the engine,
bounded by a timeout; the engine step never waits on the network. Only the grpc path
exists: an NCCL pull between GPU nodes is not built.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from pdserve.kv_store.index import StoreIndex
from pdserve.kv_store.pool import BlockPool
from pdserve.kv_store.pool_attach import PoolAttachment
from pdserve.proto.stubs.pdserve.v1 import kv_store_pb2 as pb
from pdserve.proto.stubs.pdserve.v1 import kv_store_pb2_grpc as pb_grpc
from pdserve.tls import TLSFiles, add_port, secure_channel

log = logging.getLogger("pdserve.kv_store")

MAX_READ_BLOCKS = 16384  # hashes one read may ask for (a 256k-token prefix at 16 a block)
_SLACK = 64 << 10  # a message's header beside its block
PEER_RECHECK_S = 1.0  # how often a puller asks whether any other node serves its pool


def _message_options(block_bytes: int) -> list[tuple[str, int]]:
    limit = block_bytes + _SLACK
    return [("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", max(limit, (MAX_READ_BLOCKS * 24) + _SLACK))]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(slots=True)
class ServeCounters:
    """What a node's read service served (its store process's log and tests)."""

    reads: int = 0
    refused: int = 0  # wrong secret or mismatched block shape
    blocks_sent: int = 0
    rejected_blocks: int = 0  # indexed, but whose header (or CRC) did not check before the copy
    torn_blocks: int = 0  # whose header changed during the copy


class PeerReadService:
    """Serves reads of `pool` (registered for `node` in `index`) on `host:port` (loopback and
    a free port by default; `advertise_host` replaces the host in `address`). `verify` as
    the connector's ("header" or "crc"); `pin_lease_s` bounds how long a reader that stalls
    keeps slots pinned (its stream is cut by its own deadline well before)."""

    def __init__(self, index: StoreIndex, node: str, pool: BlockPool, secret: str,
                 host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 tls: TLSFiles | None = None, verify: str = "header",
                 pin_lease_s: float = 30.0, threads: int = 4, max_streams: int = 64):
        if not secret:
            raise ValueError("the KV store read service needs a non-empty secret")
        self.index = index
        self.node = node
        self.pool = pool
        self._secret = secret.encode()
        self.verify = verify
        self.pin_lease_ms = int(pin_lease_s * 1000)
        self.counters = ServeCounters()
        self._lock = threading.Lock()
        # A thread a stream: a read is short (a pinned memcpy per block), and at most
        # `max_streams` are admitted at once (more get RESOURCE_EXHAUSTED).
        self._server = grpc.server(futures.ThreadPoolExecutor(threads,
                                                              thread_name_prefix="kv-peer"),
                                   options=_message_options(pool.block_bytes),
                                   maximum_concurrent_rpcs=max_streams)
        pb_grpc.add_KVStorePeerServicer_to_server(_Servicer(self), self._server)
        bound = add_port(self._server, _host_port(host, port), tls)
        if not bound:
            raise OSError(f"cannot listen for KV store reads on {host}:{port}")
        self._server.start()
        self.address = _host_port(advertise_host or host, bound)

    def close(self) -> None:
        self._server.stop(1.0).wait(5)

    def admitted(self, secret: str) -> bool:
        ok = hmac.compare_digest(secret.encode(), self._secret)
        if not ok:
            self._count(refused=1)
        return ok

    def read(self, hashes: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """(hash, bytes) of the leading run of `hashes` this pool holds whole, in order; the
        slots stay pinned until the generator ends (or is closed: the peer went away)."""
        self._count(reads=1)
        found = self.index.pin(self.node, hashes, self.pin_lease_ms)
        if found is None:
            return
        path, refs = found
        try:
            if path != self.pool.path:
                return  # the index names a newer store's pool: not this one's to serve
            wanted = [(r.slot, r.gen, r.block_hash) for r in refs]
            good = self.pool.check_prefix(wanted, crc=self.verify == "crc")
            self._count(rejected_blocks=len(refs) - good)
            for w in wanted[:good]:
                data = self.pool.read_bytes(w[0])
                if self.pool.recheck_prefix([w]) != 1:
                    self._count(torn_blocks=1)
                    log.error("KV store block in slot %d was rewritten while a peer read it "
                              "(a read pin did not hold): the read ends there", w[0])
                    return
                self._count(blocks_sent=1)
                yield w[2], data
        finally:
            self.index.unpin(self.node, refs)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.counters, k, getattr(self.counters, k) + v)


class _Servicer(pb_grpc.KVStorePeerServicer):
    def __init__(self, service: PeerReadService):
        self.service = service

    def ReadBlocks(self, request: pb.ReadBlocksRequest, context) -> Iterator[pb.StoredBlock]:
        svc = self.service
        if not svc.admitted(request.secret):  # before anything else
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong KV store secret")
        pool = svc.pool
        if tuple(request.block_shape) != pool.block_shape or request.dtype != pool.dtype:
            svc._count(refused=1)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this pool holds {pool.dtype} blocks of {list(pool.block_shape)}, "
                          f"not {request.dtype} {list(request.block_shape)}")
        hashes = list(request.hashes)
        if len(hashes) > MAX_READ_BLOCKS or any(len(h) != 16 for h in hashes):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a read asks for at most {MAX_READ_BLOCKS} 16-byte block hashes")
        reads = svc.read(hashes)
        try:
            for block_hash, data in reads:
                yield pb.StoredBlock(hash=block_hash, data=data)
        finally:
            reads.close()  # unpins at once, also when the peer went away mid-stream


@dataclass(slots=True)
class PullCounters:
    """What a worker pulled from other nodes (WorkerStats' store_pulled_* fields)."""

    pulls: int = 0  # pulls that found a peer holding more than this node's pool
    blocks: int = 0  # blocks written into this node's pool
    bytes: int = 0
    seconds: float = 0.0  # of the pulls that found a peer: locate, read, write, commit
    failures: int = 0  # pulls that ended in an error or a timeout (a miss)


class PeerPuller:
    """Copies a prefix other nodes' pools hold, and this node's (`node`) lacks, into this
    node's pool. Thread-safe; one pooled channel per peer address (TLS with `tls`). A pull
    that finds a peer takes up to `timeout_s` for its read."""

    def __init__(self, index: StoreIndex, node: str, pools: PoolAttachment, secret: str,
                 tls: TLSFiles | None = None, timeout_s: float = 5.0, crc: bool = False,
                 peer_recheck_s: float = PEER_RECHECK_S):
        self.index = index
        self.crc = crc  # write each block's CRC (the node's loads verify "crc")
        self.node = node
        self.pools = pools
        self.secret = secret
        self.tls = tls
        self.timeout_s = timeout_s
        self.counters = PullCounters()
        self._block_shape = [int(x) for x in pools.block_shape]
        self._dtype = str(pools.dtype).removeprefix("torch.")
        self._block_bytes = math.prod(self._block_shape) * torch.empty(
            (), dtype=pools.dtype).element_size()
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        # On a single-node cluster there is never a peer: asking Redis once a second, not
        # once per request, keeps the pull off every request's path (a new node's pool is
        # pulled from at most `peer_recheck_s` after it registers).
        self.peer_recheck_s = peer_recheck_s
        self._peers_seen_at = -peer_recheck_s
        self._peers = False

    def close(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.close()

    def pull(self, hashes: Sequence[bytes]) -> int:
        """Make this node's pool hold as much of `hashes`' prefix as another node's does;
        returns the blocks written. Never raises for a peer's or the network's failure: it
        logs, counts and returns what it committed (usually 0)."""
        if not hashes or not self.index.available or not self._any_peer():
            return 0
        t0 = time.perf_counter()
        held, peers = self.index.locate(self.node, hashes)
        if not peers:
            return 0
        peer, address, n = peers[0]
        written = 0
        try:
            blocks = self._read(address, list(hashes[held:n]))
            written = self._write(blocks)
        except grpc.RpcError as e:
            self._count(failures=1)
            log.warning("pulling %d KV blocks from node %s (%s) failed: %s %s", n - held, peer,
                        address, e.code(), e.details())
        except Exception:  # noqa: BLE001 - a failed pull is a miss; the request goes on
            self._count(failures=1)
            log.exception("pulling %d KV blocks from node %s (%s) failed", n - held, peer,
                          address)
        self._count(pulls=1, blocks=written, bytes=written * self._block_bytes,
                    seconds=time.perf_counter() - t0)
        return written

    def _any_peer(self) -> bool:
        now = time.monotonic()
        if now - self._peers_seen_at >= self.peer_recheck_s:
            self._peers_seen_at = now
            self._peers = self.index.has_peers(self.node)
        return self._peers

    def _read(self, address: str, want: list[bytes]) -> list[tuple[bytes, bytes]]:
        """The leading blocks of `want` the peer sent whole and in order."""
        stub = pb_grpc.KVStorePeerStub(self._channel(address))
        stream = stub.ReadBlocks(pb.ReadBlocksRequest(
            secret=self.secret, hashes=want, block_shape=self._block_shape, dtype=self._dtype),
            timeout=self.timeout_s)
        out: list[tuple[bytes, bytes]] = []
        try:
            for msg in stream:
                if (len(out) >= len(want) or msg.hash != want[len(out)]
                        or len(msg.data) != self._block_bytes):
                    log.warning("KV store peer %s sent a block out of order or of the wrong "
                                "size: the pull ends there", address)
                    break
                out.append((msg.hash, msg.data))
        finally:
            stream.cancel()  # no-op when it completed; else the peer unpins at once
        return out

    def _write(self, blocks: list[tuple[bytes, bytes]]) -> int:
        """Write `blocks` into this node's pool as a save does; returns how many committed."""
        if not blocks:
            return 0
        got = self.index.alloc(self.node, [h for h, _ in blocks])
        if got is None:
            return 0
        path, refs = got
        pool = self.pools.get(path)
        if pool is None or not refs:
            return 0  # the slots' write leases run out and free them
        data = dict(blocks)
        for ref in refs:  # a hash already indexed (someone else wrote it) has no ref
            pool.write_bytes(ref.slot, ref.gen, ref.block_hash, data[ref.block_hash],
                             crc=self.crc)
        return self.index.commit(self.node, refs)

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = secure_channel(address, self.tls,
                                         _message_options(self._block_bytes))
                self._channels[address] = channel
            return channel

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.counters, k, getattr(self.counters, k) + v)
