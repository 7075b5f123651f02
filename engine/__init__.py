"""pdserve's model runtime, shared by prefill and decode workers.

`from pdserve.engine import LLM, SamplingParams` is the offline API; workers build
`LLMEngine`. The names are resolved on first use (PEP 562) so that importing a light
submodule — `engine.sampling_params`, `engine.tokenizer`, as the router does — never
imports torch and the model code behind `LLM`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.engine.llm import LLM, CompletionOutput
    from pdserve.engine.sampling_params import SamplingParams

_LAZY = {
    "LLM": "pdserve.engine.llm",
    "CompletionOutput": "pdserve.engine.llm",
    "SamplingParams": "pdserve.engine.sampling_params",
}

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
