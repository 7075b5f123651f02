"""The pool's read protocol (kv_store/pool.py): a slot is used only when its header (hash,
generation) is what the index promised both before and after the copy, so a slot rewritten
during a read, a writer that died before its header, and a corrupted header are misses; a
CRC, when asked for, also catches bytes changed in place. Then the store connector on top
of it, against a real redis-server: a pin that ran out mid-load fails the step (CPU),
`load_now` ends before a block rewritten under it, and `verify: crc` end to end."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pdserve.engine.kv_cache.block_hash import hash_blocks
from pdserve.engine.kv_connector import LoadSpec, StepTransfers
from pdserve.kv_store.connector import StoreConnector, StoreReadError
from pdserve.kv_store.index import StoreIndex
from pdserve.kv_store.node_store import NodeStore
from pdserve.kv_store.pool import BlockPool
from tests.unit.test_kv_store_index import finish_and_save, seq

SHAPE = (2, 2, 4, 1, 8)  # [layers, K|V, block_size, kv_heads, head_dim]: tiny blocks


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def pool(tmp_path):
    p = BlockPool.create(str(tmp_path / "pool"), 4, SHAPE, "float32")
    for s in range(4):
        p.write(s, s + 1, h(s), torch.full(SHAPE, float(s)))
    yield p
    p.close()


def wanted(n: int) -> list[tuple[int, int, bytes]]:
    return [(s, s + 1, h(s)) for s in range(n)]


def test_a_slot_rewritten_between_the_two_header_reads_is_a_miss_from_it_on(pool):
    want = wanted(4)
    assert pool.check_prefix(want) == 4
    pool.write(2, 10, h(9), torch.full(SHAPE, 9.0))  # a writer whose pin ran out, mid-read
    out = torch.empty(4, *SHAPE)
    for i, (slot, _, _) in enumerate(want):
        pool.read_into(slot, out[i])
    assert pool.recheck_prefix(want) == 2  # slots 2 and 3: a miss
    assert pool.check_prefix(want[:2]) == 2 and pool.recheck_prefix([]) == 0


def test_concurrent_rewrites_never_pass_a_torn_copy(tmp_path):
    """A writer rewrites one slot as fast as it can (every value of generation g is g); a
    reader follows the protocol. Copies it accepts are whole; the torn ones it saw (the
    race happened) were all refused."""
    shape = (8, 2, 16, 8, 128)  # 1 MiB: long copies, that overlap the writer's
    p = BlockPool.create(str(tmp_path / "pool"), 1, shape, "float32")
    stop = threading.Event()

    def writer():
        g, src = 1, torch.empty(shape)
        while not stop.is_set():
            src.fill_(float(g))
            p.write(0, g, h(1), src)
            g += 1

    t = threading.Thread(target=writer)
    t.start()
    out = torch.empty(shape)
    accepted = torn = torn_accepted = 0
    deadline = time.monotonic() + 10
    try:
        while (torn < 20 or accepted < 20) and time.monotonic() < deadline:
            g = int(p.headers["gen"][0])  # what an index would have promised
            if g == 0 or not p.check(0, g, h(1)):
                continue
            p.read_into(0, out)
            whole = bool((out == float(g)).all())
            ok = p.recheck_prefix([(0, g, h(1))]) == 1
            accepted += ok
            torn += not whole
            torn_accepted += ok and not whole
    finally:
        stop.set()
        t.join()
        p.close()
    assert torn_accepted == 0
    assert torn > 0 and accepted > 0, (torn, accepted)  # both sides of the race were seen


def test_a_writer_that_died_before_its_header_leaves_a_miss(pool, monkeypatch):
    new = torch.full(SHAPE, 7.0)

    def crash(*args):
        raise SystemExit("writer killed")

    monkeypatch.setattr(pool, "_publish", crash)
    with pytest.raises(SystemExit):
        pool.write(1, 20, h(7), new)
    assert torch.equal(pool.blocks[1], new)  # every byte is there, the header is not
    assert not pool.check(1, 20, h(7)) and not pool.check(1, 20, h(7), crc=True)
    assert not pool.check(1, 2, h(1))  # nor is the slot's previous block any more
    monkeypatch.undo()
    with pytest.raises(RuntimeError):  # a copy that fails halfway (here: at once)
        pool.write(2, 21, h(8), torch.zeros(3))
    assert not pool.check(2, 3, h(2)) and not pool.check(2, 21, h(8))
    assert pool.check_prefix(wanted(4)) == 1


def test_a_corrupted_header_is_a_miss(pool):
    hashes = pool.headers["hash"]
    flipped = bytearray(h(1))
    flipped[3] ^= 0x10
    hashes[1] = bytes(flipped)
    assert pool.check_prefix(wanted(4)) == 1
    pool.headers["gen"][0] = 99
    assert pool.check_prefix(wanted(4)) == 0
    assert pool.check_prefix([(-1, 1, h(0))]) == 0 and pool.check_prefix([(4, 1, h(0))]) == 0
    with pytest.raises(ValueError, match="positive generation"):
        pool.write(0, 0, h(0), torch.zeros(SHAPE))


def test_crc_mode_catches_bytes_changed_in_place(tmp_path):
    p = BlockPool.create(str(tmp_path / "pool"), 3, SHAPE, "float32")
    try:
        for s in range(3):
            p.write(s, s + 1, h(s), torch.full(SHAPE, float(s)), crc=s < 2)
        want = wanted(3)
        assert p.check_prefix(want) == 3
        assert p.check_prefix(want, crc=True) == 2  # slot 2 was written without a CRC
        p.blocks[1].view(torch.uint8).view(-1)[5] ^= 0x01  # one flipped bit
        assert p.check_prefix(want, crc=True) == 1
        assert p.check_prefix(want) == 3  # the header check does not read the bytes
    finally:
        p.close()


# ---- the connector, against a real redis-server --------------------------------------------


@pytest.fixture
def store(redis_server, tmp_path, request):
    index = StoreIndex(redis_server.url)
    s = NodeStore(index, f"node-{request.node.name[-24:]}", num_slots=4, block_shape=SHAPE,
                  dtype="float32", shm_dir=str(tmp_path), lease_s=2.0)
    yield s
    s.close()
    index.close()


def connector(store, **kw) -> tuple[StoreConnector, torch.Tensor]:
    kv = torch.zeros(SHAPE[0], 2, 8, *SHAPE[2:])  # 8 blocks, the engine's pool layout
    conn = StoreConnector(StoreIndex(store.index.url), store.node, **kw)
    conn.register_kv_cache(kv, "key")
    return conn, kv


def save(conn: StoreConnector, tokens: list[int], rid: str) -> None:
    """Save `tokens`' full blocks from the connector's KV blocks 0.. (the test_kv_store_index
    helper, for 4-token blocks)."""
    finish_and_save(conn, seq(rid, tokens), len(tokens) // SHAPE[2], "key")


def test_a_pin_that_ran_out_mid_load_fails_the_step_and_unpins(store):
    a, kv_a = connector(store)
    kv_a.normal_()
    save(a, list(range(13)), "x")  # 3 blocks of 4
    b, kv_b = connector(store, pin_lease_s=0.2)
    assert b.num_external_tokens(seq("y", list(range(13))), 0) == 12
    time.sleep(0.4)  # the pins' lease runs out: the slots may be handed to a writer
    save(a, list(range(100, 117)), "z")  # 4 new blocks evict every unpinned slot
    b.start_step(StepTransfers(load=(LoadSpec("y", (4, 5, 6, 7), 0, 12),)))
    with pytest.raises(StoreReadError, match="rewritten while they were loaded"):
        b.wait_for_layer(0)  # before the first layer reads the torn blocks
    b.end_step()  # raised once
    assert b.counters.torn_blocks >= 1 and store.index.pool_stats(store.node).pinned_blocks == 0
    for c in (a, b):
        c.close()


def test_load_now_ends_before_a_block_rewritten_during_the_copy(store, monkeypatch):
    a, kv_a = connector(store)
    kv_a.normal_()
    tokens = list(range(13))
    save(a, tokens, "x")
    b, kv_b = connector(store)
    read = BlockPool.read_into
    calls = []

    def read_while_rewritten(pool, slot, out):
        calls.append(slot)
        if len(calls) == 2:  # a writer whose pin ran out takes the second slot mid-load
            pool.write(slot, 10**18, h(5), torch.zeros(SHAPE))
        read(pool, slot, out)

    monkeypatch.setattr(BlockPool, "read_into", read_while_rewritten)
    got = b.load_now(tokens, 0, [5, 6, 7])
    assert len(calls) == 3 and len(got) == 1  # the blocks from the rewritten one on: a miss
    assert torch.equal(kv_b[:, :, 5], kv_a[:, :, 0])
    assert b.counters.torn_blocks == 2 and store.index.pool_stats(store.node).pinned_blocks == 0
    for c in (a, b):
        c.close()


def test_verify_crc_saves_crcs_and_refuses_bytes_changed_in_place(store):
    with pytest.raises(ValueError, match="verify"):
        StoreConnector(store.index, store.node, verify="md5")
    a, kv_a = connector(store, verify="crc")
    kv_a.normal_()
    tokens = list(range(13))
    save(a, tokens, "x")
    crc, _ = connector(store, verify="crc")
    header, _ = connector(store)
    assert crc.num_external_tokens(seq("c1", tokens), 0) == 12
    crc.request_finished(seq("c1", tokens))  # unpins
    second = hash_blocks(tokens[:12], SHAPE[2], "key")[1]
    (ref,) = store.index.pin(store.node, [second], 1000)[1]
    store.index.unpin(store.node, [ref])
    store.pool.blocks[ref.slot].view(torch.uint8).view(-1)[0] ^= 0x80
    assert crc.num_external_tokens(seq("c2", tokens), 0) == 4  # ends before the changed one
    assert crc.counters.rejected_blocks == 2
    assert header.num_external_tokens(seq("h", tokens), 0) == 12  # trusts the header
    for s, c in (("c2", crc), ("h", header)):
        c.request_finished(seq(s, tokens))
    assert store.index.pool_stats(store.node).pinned_blocks == 0
    for c in (a, crc, header):
        c.close()
