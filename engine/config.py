"""Frozen configuration objects for the engine.

`ModelConfig` describes an architecture (read from a GGUF header or an HF `config.json`);
`CacheConfig` the paged KV pool; `SchedulerConfig` the batching limits; `ParallelConfig` how
one replica is split over ranks. They are frozen so that a worker's configuration cannot
drift after its keys (`ContentKey` here, `LayoutKey` in `engine.kv_cache.layout`) were
computed from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
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
    # Identifies the weights (file digest or directory fingerprint); part of the content
    # key so that two workers with different weights refuse to share KV.
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
    # Prompts that all finish within this many tokens run in a step of their own, without
    # the running decode rows, unless the step before was such a step (`Scheduler`, "solo
    # prefills"); 0: prompts always share a step with the decode rows (mixed batches, as
    # vLLM's). None: the engine picks (CPU 128, CUDA 0: `solo_prefill_default`).
    solo_prefill_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.solo_prefill_tokens is not None and self.solo_prefill_tokens < 0:
            raise ValueError(
                f"solo_prefill_tokens must be >= 0, got {self.solo_prefill_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


def solo_prefill_default(device: str) -> int:
    """`SchedulerConfig.solo_prefill_tokens` when left to the engine. On a CPU a step of a
    short prompt is compute-bound, so every decode row in it adds nearly a whole row's
    compute to the prompt's first token (64-token prompt beside 24 rows, two threads: 92
    ms mixed against 56 alone, a 24-row decode step 42); on a GPU the rows ride along
    almost free and a separate step would cost a whole decode step."""
    return 128 if device == "cpu" else 0


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How one model replica is split: `tensor_parallel_size` ranks share every layer
    (KV heads split between them), `pipeline_parallel_size` stages split the layers (each
    stage a TP group). The ranks themselves, and their collective timeout, come from the
    rank group the driver is given (`engine.executor.group.init_rank_group`).

    `pipeline_overlap` (with more than one stage): the engine keeps up to one step a stage
    in flight, each over other sequences, so the stages work at once across steps; off,
    each step waits for the one before it (the stages overlap only within a step)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_overlap: bool = True

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(
                f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one engine instance needs; built by `LLM` or by a worker from YAML."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention_backend: str = "auto"
    num_threads: int | None = None
    # CPU steps of at most this many tokens run on one thread, larger ones on num_threads
    # (`engine.cpu_threads.StepThreads`); 0: every step on num_threads.
    small_step_tokens: int = 8
    # Replay decode steps from captured graphs (`engine.cuda_graph`; CUDA only), and run
    # norms, RoPE and SiLU-mul as fused kernels (`engine.models.fused_llama`: Triton on
    # CUDA, our C++ ops for float32 on an AVX2 CPU).
    enable_cuda_graphs: bool = True
    enable_fused_kernels: bool = True

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if self.small_step_tokens < 0:
            raise ValueError(f"small_step_tokens must be >= 0, got {self.small_step_tokens}")


# Names the per-layer block format `[block_size, kv_heads, head_dim]` of K and V (the
# layout contract in engine/kv_cache/layout.py); bump it when that format changes.
KV_FORMAT = "LKV[nb,bs,h,d]/v1"


@dataclass(frozen=True, slots=True)
class ContentKey:
    """What the numbers in a KV block mean: which weights, tokenizer, dtype and architecture
    produced them. Two sides with equal content keys hold the same K and V for the same
    token ids, however each splits them over ranks, stages or blocks.

    Its `digest` goes into every block hash (`engine.kv_cache.block_hash`), so a block
    means the same thing on every worker, store and node, and transports check it on every
    transfer (`KVSink.compat_key` carries it). It deliberately leaves out how a side holds
    the blocks (block size, TP/PP split: `engine.kv_cache.layout.LayoutKey`), so workers of
    different layouts still agree on block hashes.
    """

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope: str  # theta and scaling: K is cached after rotation
    revision: str
    tokenizer: str
    dtype: str
    kv_format: str = KV_FORMAT

    @classmethod
    def for_model(cls, model: ModelConfig, dtype: str, tokenizer: str = "") -> ContentKey:
        """The key of `model`'s weights run in `dtype`; `tokenizer` is the tokenizer's
        fingerprint (the same token ids must mean the same text on both sides)."""
        scaling = asdict(model.rope_scaling) if model.rope_scaling else None
        return cls(
            architecture=model.architecture, num_layers=model.num_layers,
            num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim, hidden_size=model.hidden_size,
            rope=json.dumps([model.rope_theta, scaling], sort_keys=True),
            revision=model.revision, tokenizer=tokenizer, dtype=dtype,
        )

    @property
    def digest(self) -> str:
        """16 hex digits naming this key: what block hashes and transfers carry."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ContentKey:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"ContentKey fields must be exactly {sorted(names)}, got {sorted(d)}")
        return cls(**d)


def model_config_dict(model: ModelConfig) -> dict:
    """A JSON-able view of a model config (for logs and handshakes)."""
    return asdict(model)
