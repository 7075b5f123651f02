"""The KV store micro-benchmark (bench/micro/gpu_kv_store.py) on CPU, with the real SmolLM2
model and a real redis-server: the smoke path of the GPU run. Its figures are sane: the
whole prefix comes from the store, only the suffix is prefilled, both TTFTs are real, and
the greedy first token is the same whether the prefix was recomputed or loaded."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.micro import gpu_kv_store

pytestmark = pytest.mark.slow


def test_cpu_smoke_run_loads_the_whole_prefix_and_keeps_the_first_token(
        redis_server, tmp_path, capsys):
    out = tmp_path / "kv_store.json"
    res = gpu_kv_store.main([
        "--device", "cpu", "--model", "smollm2-135m-instruct", "--prompt-len", "128",
        "--suffix-len", "8", "--repeats", "2", "--warmup", "0",
        "--redis-url", redis_server.url, "--shm-dir", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == res["summary"]
    assert "| prefix loaded |" in capsys.readouterr().out
    assert len(res["rounds"]) == 2 and not res["pool_pinned"]  # nothing to pin on CPU
    for r in res["rounds"]:
        assert r["loaded_tokens"] == 128 and r["saved_blocks"] == 8 and r["save_skipped"] == 0
        assert r["prefill_tokens_recompute"] == 136 and r["prefill_tokens_loaded"] == 8
        assert r["loaded_bytes"] == 8 * res["block_bytes"]
        assert r["recompute_ms"] > 0 and r["loaded_ms"] > 0
        assert r["lookup_ms"] > 0 and r["load_ms"] > 0 and r["load_GBps"] > 0
        assert r["first_token_equal"], r
    assert res["summary"]["first_tokens_equal"] == 2
