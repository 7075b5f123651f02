"""The global KV store's CUDA path: the pool pinned for DMA, a batched load (scattered
slots into scattered blocks, over several staging chunks) and a save off the compute
stream, byte for byte; and the store micro-benchmark end to end on the GPU in fp32, where
the greedy first token must not change when the prefix is loaded instead of recomputed."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from pdserve.bench.micro import gpu_kv_store  # noqa: E402
from pdserve.kv_store.cuda_copy import CudaBlockCopier  # noqa: E402
from pdserve.kv_store.pool import BlockPool  # noqa: E402

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


def test_store_bench_on_cuda_fp32_loads_the_prefix_and_keeps_the_first_token(
        redis_server, tmp_path):
    res = gpu_kv_store.main([
        "--device", "cuda", "--model", "random:smollm2-135m", "--dtype", "float32",
        "--prompt-len", "256", "--repeats", "2", "--warmup", "1",
        "--redis-url", redis_server.url, "--shm-dir", shm_dir(tmp_path),
        "--out", str(tmp_path / "kv_store.json")])
    assert res["pool_pinned"]
    for r in res["rounds"]:
        assert r["loaded_tokens"] == 256 and r["prefill_tokens_loaded"] == 16
        assert r["first_token_equal"], r
        assert r["load_GBps"] > 0
    assert res["h2d"]["pinned_GBps"] > 0 and res["load_share_of_pinned"] > 0
