"""Frozen configuration objects for the engine.

`ModelConfig` describes an architecture (read from a GGUF header or an HF `config.json`);
`CacheConfig` the paged KV pool; `SchedulerConfig` the batching limits. They are frozen so
that a worker's configuration cannot drift after the compatibility key was computed from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# Names only: the router reads these configs (cluster/config.py) and must not import torch.
_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(name: str) -> str:
    """A dtype name from a config file, refused with a clear error unless supported."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; supported: {sorted(_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name from a config file to a torch dtype, with a clear error."""
    import torch

    return getattr(torch, check_dtype(name))


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3.1 style rope scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture of one Llama-family model.

    Invariants: `num_heads % num_kv_heads == 0` (GQA groups), `head_dim` even (RoPE rotates
    halves).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Identifies the weights (file digest or directory fingerprint); part of the
    # compatibility key so that two workers with different weights refuse to share KV.
    revision: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        assert self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of kv heads"
        assert self.head_dim % 2 == 0, "head_dim must be even for RoPE"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV pool.

    Exactly one of `num_blocks` and `memory_bytes` decides the pool size; with
    `memory_bytes` the engine divides the budget by the bytes one block takes over all
    layers (see `engine.kv_cache.layout.block_bytes`).
    """

    block_size: int = 16
    memory_bytes: int = 256 * 2**20
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.num_blocks is None and self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1, got {self.memory_bytes}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Batching limits: sequences per step and tokens per step (the chunked-prefill budget)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one engine instance needs; built by `LLM` or by a worker from YAML."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"
    num_threads: int | None = None
    # CUDA only (no-ops elsewhere): replay decode steps from captured graphs
    # (`engine.cuda_graph`), and run norms, RoPE and SiLU-mul as fused Triton kernels
    # (`engine.models.fused_llama`).
    enable_cuda_graphs: bool = True
    enable_fused_kernels: bool = True

    def __post_init__(self) -> None:
        check_dtype(self.dtype)


def compatibility_key(model: ModelConfig, block_size: int, dtype: str) -> str:
    """A short digest of everything two workers must agree on to exchange KV blocks.

    Covers the KV layout (layers, kv heads, head dim, block size, dtype) and the weights'
    revision. The handshake between prefill and decode compares these strings and refuses
    a mismatch; block hashes include it so that caches of different models never collide.
    """
    fields = {
        "arch": model.architecture,
        "layers": model.num_layers,
        "kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "block_size": block_size,
        "dtype": dtype,
        "revision": model.revision,
        "layout": "LKV[nb,bs,h,d]/v1",
    }
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_config_dict(model: ModelConfig) -> dict:
    """A JSON-able view of a model config (for logs and handshakes)."""
    return asdict(model)
