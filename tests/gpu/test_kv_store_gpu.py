"""The global KV store's CUDA path: the pool pinned for DMA, a batched load (scattered
slots into scattered blocks, over several staging chunks) and a save off the compute
stream, byte for byte; a CUDA worker pinning its node's pool at start-up, before any
request; an asynchronous load whose slots were rewritten under it failing its step; and
the store micro-benchmark end to end on the GPU in fp32, where the greedy first token must
not change when the prefix is loaded instead of recomputed (with either slot check)."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from pdserve.bench.micro import gpu_kv_store  # noqa: E402
from pdserve.engine.kv_connector import LoadSpec, StepTransfers  # noqa: E402
from pdserve.kv_store.connector import StoreConnector, StoreReadError  # noqa: E402
from pdserve.kv_store.cuda_copy import CudaBlockCopier  # noqa: E402
from pdserve.kv_store.index import StoreIndex  # noqa: E402
from pdserve.kv_store.node_store import NodeStore  # noqa: E402
from pdserve.kv_store.pool import BlockPool  # noqa: E402
from tests.unit.test_kv_store_index import SHAPE as TINY  # noqa: E402
from tests.unit.test_kv_store_index import finish_and_save, seq  # noqa: E402

SHAPE = (4, 2, 16, 2, 64)  # [L, 2, block_size, kv_heads, head_dim] of one block


def shm_dir(tmp_path) -> str:
    """tmpfs, as in production (a pool file on another filesystem may not pin)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)


def test_pinned_pool_batched_load_and_save_are_byte_exact(tmp_path):
    path = os.path.join(shm_dir(tmp_path), f"pdserve-test-pool-{os.getpid()}")
    pool = BlockPool.create(path, 12, SHAPE, "bfloat16")
    try:
        src = torch.randn(12, *SHAPE).to(torch.bfloat16)
        for s in range(12):
            pool.write(s, s + 1, bytes([s]) * 16, src[s])
        assert pool.pin_for_cuda() and pool.pin_for_cuda()  # idempotent
        kv = torch.zeros(SHAPE[0], 2, 16, *SHAPE[2:], dtype=torch.bfloat16, device="cuda")
        block_bytes = kv[:, :, 0].numel() * 2
        copier = CudaBlockCopier(kv, staging_bytes=2 * block_bytes)  # 3 chunks of <= 2
        slots, ids = [5, 6, 7, 1, 3], [9, 2, 4, 0, 11]
        pending = copier.load(pool, slots, ids)
        copier.wait_loaded(pending)
        assert pending.wait() > 0 and pending.nbytes == 5 * block_bytes
        got = kv.cpu()
        for s, b in zip(slots, ids):
            assert torch.equal(got[:, :, b], src[s])
        untouched = [b for b in range(16) if b not in ids]
        assert not got[:, :, untouched].any()

        kv[:, :, 13] = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
        with copier.save_stream_context():
            pool.write(8, 99, b"s" * 16, kv[:, :, 13])
        assert pool.check(8, 99, b"s" * 16)
        assert torch.equal(pool.blocks[8], kv[:, :, 13].cpu())
    finally:
        pool.close()
        assert not pool.pinned
        os.unlink(path)


def cuda_connector(redis_server, node: str, shape=SHAPE, **kw
                   ) -> tuple[StoreConnector, torch.Tensor]:
    kv = torch.zeros(shape[0], 2, 8, *shape[2:], dtype=torch.bfloat16, device="cuda")
    conn = StoreConnector(StoreIndex(redis_server.url), node, **kw)
    conn.register_kv_cache(kv, "key")
    return conn, kv


def test_a_cuda_worker_pins_its_nodes_pool_at_start_up(redis_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pdserve.kv_store")
    conn, _ = cuda_connector(redis_server, "node-pin")  # a worker starts before its store
    index = StoreIndex(redis_server.url)
    store = NodeStore(index, "node-pin", 64, SHAPE, "bfloat16", shm_dir=shm_dir(tmp_path))
    try:
        deadline = time.monotonic() + 20
        while not conn.pool_pinned:
            assert time.monotonic() < deadline, "the pool was not pinned without a request"
            time.sleep(0.05)
        assert conn.counters.lookups == 0
        assert any(store.path in r.getMessage() and "pinned for CUDA" in r.getMessage()
                   for r in caplog.records), caplog.text
    finally:
        conn.close()
        store.close()
        index.close()


def test_a_cuda_load_whose_slots_were_rewritten_fails_its_step(redis_server, tmp_path):
    shape = TINY  # finish_and_save's block size
    index = StoreIndex(redis_server.url)
    store = NodeStore(index, "node-torn", 4, shape, "bfloat16", shm_dir=shm_dir(tmp_path))
    a, kv_a = cuda_connector(redis_server, "node-torn", shape)
    b, kv_b = cuda_connector(redis_server, "node-torn", shape, pin_lease_s=0.2)
    try:
        kv_a.normal_()
        bs = shape[2]
        finish_and_save(a, seq("x", list(range(3 * bs + 1))), 3, "key")
        assert b.attach_pool()
        assert b.num_external_tokens(seq("y", list(range(3 * bs + 1))), 0) == 3 * bs
        time.sleep(0.4)  # the pins' lease runs out: a writer may take the slots
        finish_and_save(a, seq("z", list(range(100, 100 + 4 * bs + 1))), 4, "key")
        b.start_step(StepTransfers(load=(LoadSpec("y", (4, 5, 6, 7), 0, 3 * bs),)))
        b.wait_for_layer(0)  # queued on the device: nothing known yet
        with pytest.raises(StoreReadError):
            b.end_step()
        assert b.counters.torn_blocks >= 1
        assert index.pool_stats("node-torn").pinned_blocks == 0
    finally:
        for c in (a, b):
            c.close()
        store.close()
        index.close()


def test_store_bench_on_cuda_fp32_loads_the_prefix_and_keeps_the_first_token(
        redis_server, tmp_path):
    res = gpu_kv_store.main([
        "--device", "cuda", "--model", "random:smollm2-135m", "--dtype", "float32",
        "--prompt-len", "256", "--repeats", "2", "--warmup", "1",
        "--redis-url", redis_server.url, "--shm-dir", shm_dir(tmp_path),
        "--out", str(tmp_path / "kv_store.json")])
    assert res["pool_pinned"]  # by the connector's watcher, or attach_pool, before round 1
    for r in res["rounds"]:
        for run in r["loaded"].values():
            assert run["loaded_tokens"] == 256 and run["prefill_tokens_loaded"] == 16
            assert run["first_token_equal"], r
            assert run["load_GBps"] > 0
    assert res["h2d"]["pinned_GBps"] > 0 and res["load_share_of_pinned"] > 0
