"""The KV store micro-benchmark (bench/micro/gpu_kv_store.py) on CPU, with the real SmolLM2
model and a real redis-server: the smoke path of the GPU run. Its figures are sane: the
whole prefix comes from the store, only the suffix is prefilled, both TTFTs are real, and
the greedy first token is the same whether the prefix was recomputed or loaded."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.micro import gpu_kv_store, kv_store_lookup

pytestmark = pytest.mark.slow


def test_cpu_smoke_run_loads_the_whole_prefix_and_keeps_the_first_token(
        redis_server, tmp_path, capsys):
    out = tmp_path / "kv_store.json"
    res = gpu_kv_store.main([
        "--device", "cpu", "--model", "smollm2-135m-instruct", "--prompt-len", "128",
        "--suffix-len", "8", "--repeats", "2", "--warmup", "0",
        "--redis-url", redis_server.url, "--shm-dir", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == res["summary"]
    table = capsys.readouterr().out
    assert "| prefix loaded, header check |" in table and "| prefix loaded, crc check |" in table
    assert len(res["rounds"]) == 2 and not res["pool_pinned"]  # nothing to pin on CPU
    assert res["pool_attach_s"] >= 0
    for r in res["rounds"]:
        assert r["saved_blocks"] == 8 and r["save_skipped"] == 0
        assert r["prefill_tokens_recompute"] == 136 and r["recompute_ms"] > 0
        assert set(r["loaded"]) == {"header", "crc"}
        for run in r["loaded"].values():
            assert run["loaded_tokens"] == 128 and run["prefill_tokens_loaded"] == 8
            assert run["loaded_bytes"] == 8 * res["block_bytes"]
            assert run["loaded_ms"] > 0 and run["load_GBps"] > 0
            assert run["lookup_ms"] >= run["verify_ms"] > 0 and run["load_ms"] > 0
            assert run["first_token_equal"], r
    for m in res["summary"]["loaded"].values():
        assert m["first_tokens_equal"] == 2


def test_lookup_bench_finds_the_whole_prefix_in_both_modes(redis_server, tmp_path, capsys):
    res = kv_store_lookup.main([
        "--mb", "1", "--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--repeats", "3",
        "--redis-url", redis_server.url, "--shm-dir", str(tmp_path)])
    assert res["blocks"] == 1024 // 16  # 16 KiB blocks
    assert "| crc |" in capsys.readouterr().out
    for m in res["modes"].values():
        assert m["lookup_ms"] >= m["checks_ms"] > 0
