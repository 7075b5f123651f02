"""Tiny random Llama-family models saved as HF directories, for architectures that ship no
weights here (Llama 3.1 rope scaling, Qwen2 biases, Mistral) and for tensor parallelism.

Each model is built with transformers' own config and model classes, seeded, saved with
`save_pretrained` (safetensors) next to a minimal word-level `tokenizer.json`, so our loader
reads exactly what a user's HF directory would hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    intermediate_size=128,
    bos_token_id=1,
    eos_token_id=2,
)


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose token `i` is the word `t{i}`; eos is `t2`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "t1", "eos_token": "t2", "add_bos_token": False})
    )


def build_tiny_model(arch: str, path: Path, seed: int = 0, **overrides):
    """Save a seeded random `arch` model ("llama", "qwen2", "mistral") to `path`; returns
    the HF model (fp32, eval) holding the same weights."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        # Default init (std 0.02) makes near-uniform logits whose argmax is decided by
        # rounding noise; larger weights give the clear preferences a real model has.
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.25 if p.dim() > 1 else 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    assert list(path.glob("*.safetensors")), "save_pretrained wrote no safetensors file"
    write_tokenizer(path, config.vocab_size)
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's small-batch generation on one intra-op thread, then restore.

    The batches here are a few rows wide, so a second thread buys little; on a shared
    2-core machine it costs a lot, because each op waits for both threads to be scheduled.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[..., tuple[str, object]]:
    """`factory(arch, **config_overrides) -> (directory, hf_model)`."""

    def factory(arch: str, seed: int = 0, **overrides) -> tuple[str, object]:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model = build_tiny_model(arch, path, seed=seed, **overrides)
        return str(path), model

    return factory
