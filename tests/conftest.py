"""Shared fixtures: the real SmolLM2 model, in our engine and in HF transformers."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_gguf() -> str:
    from pdserve.engine.loader.registry import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_model(smollm_gguf):
    """HF transformers' own Llama on the same GGUF, dequantized to fp32: the reference."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm_gguf), gguf_file=os.path.basename(smollm_gguf),
        dtype=torch.float32,
    )
    return model.eval()


@pytest.fixture(scope="session")
def llm():
    """Our engine with small blocks and a small token budget, so prompts are chunked and
    cross block boundaries."""
    from pdserve.engine import LLM

    return LLM(block_size=8, max_num_batched_tokens=40, num_blocks=600, max_num_seqs=16)


@pytest.fixture(scope="module")
def redis_server():
    """A private real redis-server on loopback (kv_store/redis_server.py). Skipped only
    where it is not installed outside CI; in CI (scripts/setup.sh installs it) missing is a
    failure."""
    from pdserve.kv_store.redis_server import RedisServer, RedisServerError

    try:
        server = RedisServer().start()
    except RedisServerError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no redis-server: {e}")
    yield server
    server.stop()
