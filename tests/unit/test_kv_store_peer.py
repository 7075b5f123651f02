"""Cross-node pulls of the KV store (kv_store/peer_service.py) with real gRPC on loopback and
a real redis-server: two "nodes" are two store processes' pools in one Redis. A good read
copies the prefix into the other node's pool; a wrong secret is refused and changes
nothing; a slot rewritten before or during the read ends the pulled prefix there."""

from __future__ import annotations

import grpc
import pytest
import torch
from tls_certs import make_pki

from pdserve.kv_store.index import StoreIndex
from pdserve.kv_store.node_store import NodeStore
from pdserve.kv_store.peer_service import PeerPuller
from pdserve.kv_store.pool_attach import PoolAttachment
from pdserve.proto.stubs.pdserve.v1 import kv_store_pb2 as pb
from pdserve.proto.stubs.pdserve.v1 import kv_store_pb2_grpc as pb_grpc
from pdserve.tls import TLSFiles

SHAPE = (2, 2, 4, 1, 8)  # [layers, K|V, block_size, kv_heads, head_dim]: tiny blocks
SECRET = "s3cret-for-this-test"


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(v: float) -> torch.Tensor:
    return torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float32).view(SHAPE) + v


@pytest.fixture
def nodes(redis_server, tmp_path, request):
    """(holder store "a" serving reads, reader store "b", a puller on b)."""
    tag = request.node.name[-20:]
    index = StoreIndex(redis_server.url, namespace=f"peer-{tag}")
    a = NodeStore(index, "a", num_slots=4, block_shape=SHAPE, dtype="float32",
                  shm_dir=str(tmp_path), peer_secret=SECRET)
    b = NodeStore(index, "b", num_slots=4, block_shape=SHAPE, dtype="float32",
                  shm_dir=str(tmp_path), peer_secret=SECRET)
    pools = PoolAttachment(index, "b", SHAPE, torch.float32, pin=False)
    puller = PeerPuller(index, "b", pools, SECRET, timeout_s=5.0)
    yield a, b, puller
    puller.close()
    pools.close()
    b.close()
    a.close()
    index.close()


def put(store: NodeStore, items: dict[bytes, float]) -> None:
    _, refs = store.index.alloc(store.node, list(items))
    for r in refs:
        store.pool.write(r.slot, r.gen, r.block_hash, block(items[r.block_hash]))
    assert store.index.commit(store.node, refs) == len(items)


def held(store: NodeStore, hashes: list[bytes]) -> dict[bytes, torch.Tensor]:
    """The blocks `store`'s pool holds of `hashes`' prefix, read under a pin."""
    found = store.index.pin(store.node, hashes, 10_000)
    out = {}
    if found is not None:
        _, refs = found
        for r in refs:
            assert store.pool.check(r.slot, r.gen, r.block_hash)
            t = torch.empty(SHAPE)
            store.pool.read_into(r.slot, t)
            out[r.block_hash] = t
        store.index.unpin(store.node, refs)
    return out


def no_pins(store: NodeStore) -> bool:
    return store.index.pool_stats(store.node).pinned_blocks == 0


def test_the_service_registers_its_address_with_the_pool(nodes):
    a, b, _ = nodes
    assert a.peer_address.startswith("127.0.0.1:")  # loopback unless configured
    put(a, {h(0): 0.0})
    assert a.index.locate("b", [h(0), h(1)]) == (0, [("a", a.peer_address, 1)])
    assert a.index.locate("a", [h(0)]) == (1, [])  # never its own node as a peer


def test_a_prefix_only_another_node_holds_is_pulled_into_this_nodes_pool(nodes):
    a, b, puller = nodes
    put(a, {h(0): 0.0, h(1): 1.0, h(2): 2.0})
    want = [h(0), h(1), h(2), h(3)]
    assert held(b, want) == {}
    assert puller.pull(want) == 3
    got = held(b, want)
    assert list(got) == [h(0), h(1), h(2)]
    for i, t in enumerate(got.values()):
        assert torch.equal(t, block(float(i)))
    c = puller.counters
    assert (c.pulls, c.blocks, c.failures) == (1, 3, 0)
    assert c.bytes == 3 * a.pool.block_bytes and c.seconds > 0
    assert a.service.counters.blocks_sent == 3
    assert no_pins(a) and no_pins(b)
    assert puller.pull(want) == 0  # b holds as much as anyone now: nothing to pull
    assert puller.counters.pulls == 1


def test_a_wrong_secret_is_refused_and_changes_nothing(nodes):
    a, b, puller = nodes
    put(a, {h(0): 0.0, h(1): 1.0})
    with grpc.insecure_channel(a.peer_address) as channel:
        stream = pb_grpc.KVStorePeerStub(channel).ReadBlocks(pb.ReadBlocksRequest(
            secret="not-it", hashes=[h(0), h(1)], block_shape=list(SHAPE),
            dtype="float32"), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert a.service.counters.refused == 1 and a.service.counters.reads == 0

    wrong = PeerPuller(puller.index, "b", puller.pools, "not-it", timeout_s=5.0)
    try:
        assert wrong.pull([h(0), h(1)]) == 0
        assert wrong.counters.failures == 1 and wrong.counters.blocks == 0
    finally:
        wrong.close()
    assert held(b, [h(0), h(1)]) == {}
    assert a.index.pool_stats("b").used_blocks == 0
    assert no_pins(a) and a.service.counters.blocks_sent == 0


def test_a_pool_of_another_block_shape_is_refused(nodes):
    a, _, _ = nodes
    put(a, {h(0): 0.0})
    with grpc.insecure_channel(a.peer_address) as channel:
        stream = pb_grpc.KVStorePeerStub(channel).ReadBlocks(pb.ReadBlocksRequest(
            secret=SECRET, hashes=[h(0)], block_shape=[2, 2, 8, 1, 8], dtype="float32"),
            timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert no_pins(a)


def test_a_slot_rewritten_before_the_read_ends_the_pulled_prefix(nodes):
    a, b, puller = nodes
    put(a, {h(0): 0.0, h(1): 1.0, h(2): 2.0})
    _, refs = a.index.pin("a", [h(0), h(1)], 10_000)
    a.index.unpin("a", refs)
    # Reallocated behind the index's back: the header no longer says what the index does.
    a.pool.write(refs[1].slot, refs[1].gen + 1000, h(1), block(9.0))
    assert puller.pull([h(0), h(1), h(2)]) == 1
    assert list(held(b, [h(0), h(1), h(2)])) == [h(0)]
    assert a.service.counters.rejected_blocks == 2 and no_pins(a)


def test_a_slot_rewritten_during_the_copy_is_not_sent(nodes, monkeypatch):
    a, b, puller = nodes
    put(a, {h(0): 0.0, h(1): 1.0, h(2): 2.0})
    _, refs = a.index.pin("a", [h(0), h(1)], 10_000)
    a.index.unpin("a", refs)
    torn_slot = refs[1].slot
    real = a.pool.read_bytes

    def racing_read(slot: int) -> bytes:
        data = real(slot)
        if slot == torn_slot:  # a writer whose pin check did not hold reused the slot
            a.pool.write(slot, refs[1].gen + 1000, h(7), block(7.0))
        return data

    monkeypatch.setattr(a.pool, "read_bytes", racing_read)
    assert puller.pull([h(0), h(1), h(2)]) == 1
    got = held(b, [h(0), h(1), h(2)])
    assert list(got) == [h(0)] and torch.equal(got[h(0)], block(0.0))
    assert a.service.counters.torn_blocks == 1 and no_pins(a)


def test_a_dead_peer_is_a_miss(nodes):
    a, b, puller = nodes
    put(a, {h(0): 0.0})
    a.service.close()  # the index still names it (its lease has not run out)
    assert puller.pull([h(0)]) == 0
    assert puller.counters.failures == 1 and held(b, [h(0)]) == {}


def test_pulls_over_mutual_tls_admit_only_the_clusters_certificates(redis_server, tmp_path):
    """With `tls:` the service listens with TLS (mutual here): a puller that verifies it and
    presents a certificate of the cluster's CA pulls; one without a certificate gets
    nothing (a miss), as does a plaintext one."""
    pki = make_pki(tmp_path)
    index = StoreIndex(redis_server.url, namespace="peer-tls")
    server_tls = TLSFiles(pki.server_cert, pki.server_key, pki.ca, require_client_cert=True)
    a = NodeStore(index, "a", num_slots=4, block_shape=SHAPE, dtype="float32",
                  shm_dir=str(tmp_path), peer_secret=SECRET, tls=server_tls)
    b = NodeStore(index, "b", num_slots=4, block_shape=SHAPE, dtype="float32",
                  shm_dir=str(tmp_path))
    pools = PoolAttachment(index, "b", SHAPE, torch.float32, pin=False)
    pullers = {who: PeerPuller(index, "b", pools, SECRET, tls=tls, timeout_s=5.0) for who, tls in (
        ("plaintext", None), ("no client certificate", TLSFiles(ca_file=pki.ca)),
        ("cluster", TLSFiles(pki.client_cert, pki.client_key, pki.ca)))}
    try:
        put(a, {h(0): 0.0, h(1): 1.0})
        assert pullers["plaintext"].pull([h(0), h(1)]) == 0
        assert pullers["no client certificate"].pull([h(0), h(1)]) == 0
        assert held(b, [h(0), h(1)]) == {}
        assert pullers["cluster"].pull([h(0), h(1)]) == 2
        assert list(held(b, [h(0), h(1)])) == [h(0), h(1)] and no_pins(a)
    finally:
        for p in pullers.values():
            p.close()
        pools.close()
        b.close()
        a.close()
        index.close()


def test_a_pulled_block_is_written_from_its_exact_bytes_only(nodes):
    _, b, _ = nodes
    _, (ref,) = b.index.alloc("b", [h(5)])
    with pytest.raises(ValueError, match="bytes"):
        b.pool.write_bytes(ref.slot, ref.gen, h(5), b"\0" * (b.pool.block_bytes - 1))
    data = block(5.0).numpy().tobytes()
    b.pool.write_bytes(ref.slot, ref.gen, h(5), data, crc=True)
    assert b.index.commit("b", [ref]) == 1
    assert b.pool.check(ref.slot, ref.gen, h(5), crc=True)
    assert torch.equal(held(b, [h(5)])[h(5)], block(5.0))


def test_a_node_without_peers_asks_redis_now_and_then_not_per_request(redis_server, tmp_path):
    """On a single-node cluster a pull never finds a peer: it must not cost every request a
    Redis round trip. Once another node's pool registers, pulls find it within the
    recheck interval."""
    import time

    import redis

    index = StoreIndex(redis_server.url, namespace="peer-alone")
    b = NodeStore(index, "b", num_slots=4, block_shape=SHAPE, dtype="float32",
                  shm_dir=str(tmp_path), peer_secret=SECRET)
    pools = PoolAttachment(index, "b", SHAPE, torch.float32, pin=False)
    puller = PeerPuller(index, "b", pools, SECRET, timeout_s=5.0, peer_recheck_s=0.5)
    r = redis.Redis.from_url(redis_server.url)

    def calls() -> tuple[int, int]:
        stats = r.info("commandstats")
        scripts = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("eval", "evalsha"))
        return scripts, stats.get("cmdstat_hkeys", {}).get("calls", 0)

    a = None
    try:
        before = calls()
        for _ in range(50):
            assert puller.pull([h(1), h(2)]) == 0
        after = calls()
        assert after[0] == before[0], "a pull without peers ran the index's locate script"
        assert after[1] - before[1] == 1, "a pull without peers asked for peers every time"

        a = NodeStore(index, "a", num_slots=4, block_shape=SHAPE, dtype="float32",
                      shm_dir=str(tmp_path), peer_secret=SECRET)
        put(a, {h(1): 1.0, h(2): 2.0})
        deadline = time.monotonic() + 5
        while puller.pull([h(1), h(2)]) == 0:
            assert time.monotonic() < deadline, "the new peer was never pulled from"
            time.sleep(0.1)
        got = held(b, [h(1), h(2)])
        assert torch.equal(got[h(1)], block(1.0)) and torch.equal(got[h(2)], block(2.0))
    finally:
        r.close()
        puller.close()
        pools.close()
        b.close()
        if a is not None:
            a.close()
        index.close()
