"""pdserve's model runtime, shared by prefill and decode workers.

`from engine import LLM, SamplingParams` is the offline API; workers build `LLMEngine`.
"""

from pdserve.engine.llm import LLM, CompletionOutput
from pdserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]
