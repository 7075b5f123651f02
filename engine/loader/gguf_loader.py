"""Load a Llama-family GGUF file: architecture, tokenizer fields and dequantized weights.

Weights are dequantized to float32 with the `gguf` package and renamed to HF names, so
the rest of the engine sees one naming scheme whatever the source.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.loader.model_files import open_gguf, read_fields

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def file_revision(path: str) -> str:
    """A content digest of the file: part of the compatibility key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "gguf:" + h.hexdigest()[:16]


def model_config_from_fields(fields: dict, revision: str, num_tensors_output: bool) -> ModelConfig:
    arch = fields.get("general.architecture", "?")
    if arch not in ("llama", "qwen2"):
        # Mistral GGUFs also report "llama"; anything else needs its own loader.
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama, qwen2")

    def f(name, default=None):
        return fields.get(f"{arch}.{name}", default)

    hidden = int(f("embedding_length"))
    heads = int(f("attention.head_count"))
    kv_heads = int(f("attention.head_count_kv", heads))
    rope_scaling = None
    if f("rope.scaling.type") == "llama3" or fields.get(f"{arch}.rope.scaling.factor"):
        rope_scaling = RopeScaling(
            factor=float(f("rope.scaling.factor", 8.0)),
            low_freq_factor=float(f("rope.scaling.low_freq_factor", 1.0)),
            high_freq_factor=float(f("rope.scaling.high_freq_factor", 4.0)),
            original_max_position_embeddings=int(f("rope.scaling.original_context_length", 8192)),
        )
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(f("vocab_size", len(fields.get("tokenizer.ggml.tokens", [])))),
        hidden_size=hidden,
        intermediate_size=int(f("feed_forward_length")),
        num_layers=int(f("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(f("attention.key_length", hidden // heads)),
        max_position_embeddings=int(f("context_length", 4096)),
        rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(f("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=not num_tensors_output,
        attention_bias=arch == "qwen2",
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        revision=revision,
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K weights.

    llama.cpp interleaves each head's rows as pairs (x0, x_half, x1, x_half+1, ...) for its
    rope kernel; HF layout keeps the two halves apart (rotate_half). Without this the model
    runs and produces fluent nonsense.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str) -> tuple[ModelConfig, dict, Iterator[tuple[str, torch.Tensor]]]:
    """Open a GGUF file: (model config, metadata fields, lazy iterator of HF-named tensors)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = open_gguf(path)
    fields = read_fields(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = model_config_from_fields(fields, file_revision(path), has_output)
    return config, fields, _iter_weights(reader, config)


def _hf_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        mapped = _LAYER_NAMES.get(part)
        return f"model.layers.{idx}.{mapped}.{suffix}" if mapped else None
    mapped = _TOP_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def _iter_weights(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:  # e.g. rope_freqs: recomputed from the config instead
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_rope(w, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_rope(w, config.num_kv_heads)
        if not w.flags.writeable:  # F32 tensors come memory-mapped, read-only
            w = w.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(w))
