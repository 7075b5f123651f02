"""Load an HF model directory: `config.json` + `*.safetensors` (+ tokenizer files)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator

import torch

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.loader.model_files import hf_eos_token_ids

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def _rope_settings(cfg: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 nests rope settings under `rope_parameters`; older files keep
    # `rope_theta` and `rope_scaling` at the top level.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind in ("default", None):
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, llama3")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


_REVISION_SAMPLES, _REVISION_SAMPLE_BYTES = 64, 1 << 14


def dir_revision(path: str) -> str:
    """A digest of the weight files' names, sizes, safetensors headers and sampled bytes.

    Names, sizes and headers alone are identical for every fine-tune of one base model, so
    two workers with different weights would share a compatibility key and exchange KV
    silently. Hashing every byte of a large model would take minutes at start-up; instead
    `_REVISION_SAMPLES` evenly spaced slices of each file's tensor data are hashed (all of
    it for small files), which any full fine-tune changes.
    """
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        size = os.path.getsize(f)
        h.update(os.path.basename(f).encode())
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 1 << 24)))
            data_start, data_len = 8 + n, size - 8 - n
            chunk = _REVISION_SAMPLE_BYTES
            if data_len <= _REVISION_SAMPLES * chunk:
                fh.seek(data_start)
                h.update(fh.read())
                continue
            for i in range(_REVISION_SAMPLES):
                fh.seek(data_start + i * (data_len - chunk) // (_REVISION_SAMPLES - 1))
                h.update(fh.read(chunk))
    return "hf:" + h.hexdigest()[:16]


def _context_length(cfg: dict, arch: str) -> int:
    """`max_position_embeddings`, capped at the sliding window where the model has one.

    Our attention is full causal attention. Up to `sliding_window` positions that is
    exactly what a sliding-window model (Mistral v0.1, Qwen2 with `use_sliding_window`)
    computes; past it the outputs would silently differ, so the context ends there and
    longer requests get the usual "exceeds the model's context length" error.
    """
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        windowed = "sliding_attention" in layer_types
    else:
        windowed = arch == "mistral" or bool(cfg.get("use_sliding_window"))
    if windowed and window:
        return min(max_pos, int(window))
    return max_pos


def model_config_from_hf(cfg: dict, revision: str) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(_ARCHITECTURES)}"
        )
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope_settings(cfg)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        max_position_embeddings=_context_length(cfg, arch),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=hf_eos_token_ids(cfg),
        revision=revision,
    )


def load_hf_dir(path: str) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Open an HF directory: (model config, lazy iterator of (name, tensor))."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path} has no config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    # Check the architecture before looking for weights: "unsupported architecture X" is
    # the error a user of a non-Llama model needs, whatever files the directory holds.
    config = model_config_from_hf(cfg, dir_revision(path) if files else "")
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    return config, _iter_safetensors(files)


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
