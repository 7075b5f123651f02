"""Random-weight models of real shapes, for GPU benchmarks and tests where no weights can be
downloaded or shipped.

`random:<preset>` (or `random:<preset>@<seed>`) names a model: the architecture of a real
checkpoint (`llama-3.1-8b`, `smollm2-135m`, or the CPU-sized `tiny`) with weights drawn from
a fixed seed. Each tensor is drawn straight on the target device in the target dtype from
its own generator, seeded by (seed, tensor name), so loading 16 GB of bf16 never touches the
host and the same name gives the same tensor whatever order it is read in. Linear and
embedding weights are N(0, 0.02) — the usual init, small enough that bf16 activations stay
finite over 32 layers — and norm weights 1 + N(0, 0.1), so a norm that is not loaded shows.

Draws differ between CPU and CUDA generators and between dtypes, so the revision (part of
the KV compatibility key) names the preset, the seed, the generator's device type and the
dtype.

The tokenizer is a stand-in: text encodes to its UTF-8 bytes (ids 0-255), and every id
decodes to `<id>`, so token-id prompts work end to end and output stays readable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.tokenizer import ChatTemplateError

if TYPE_CHECKING:
    import torch

PREFIX = "random:"
INIT_STD = 0.02
NORM_STD = 0.1

PRESETS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    ),
    "smollm2-135m": dict(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # CPU tests: small enough for fp32 on two cores, with GQA and llama3 rope scaling.
    "tiny": dict(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
    ),
}


def is_synthetic(name: str) -> bool:
    return name.startswith(PREFIX)


def parse_name(name: str) -> tuple[str, int]:
    """`random:<preset>[@<seed>]` -> (preset, seed), with a clear error for unknown presets."""
    spec = name.removeprefix(PREFIX)
    preset, _, seed = spec.partition("@")
    if preset not in PRESETS:
        raise ValueError(
            f"unknown random-weight preset {preset!r}; presets: {', '.join(sorted(PRESETS))}"
        )
    try:
        return preset, int(seed) if seed else 0
    except ValueError:
        raise ValueError(f"seed in {name!r} must be an integer") from None


def synthetic_config(name: str, device: torch.device, dtype: torch.dtype) -> ModelConfig:
    import torch  # here, not at the top: the router builds this model's tokenizer

    preset, seed = parse_name(name)
    dtype_name = str(dtype).removeprefix("torch.")
    revision = f"{PREFIX}{preset}@{seed}/{torch.device(device).type}/{dtype_name}"
    return ModelConfig(**PRESETS[preset], revision=revision)


def weight_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """HF names and full shapes of every tensor of a Llama-family checkpoint."""
    h, d = config.hidden_size, config.head_dim
    yield "model.embed_tokens.weight", (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.self_attn.q_proj.weight", (config.num_heads * d, h)
        yield f"{p}.self_attn.k_proj.weight", (config.num_kv_heads * d, h)
        yield f"{p}.self_attn.v_proj.weight", (config.num_kv_heads * d, h)
        if config.attention_bias:
            yield f"{p}.self_attn.q_proj.bias", (config.num_heads * d,)
            yield f"{p}.self_attn.k_proj.bias", (config.num_kv_heads * d,)
            yield f"{p}.self_attn.v_proj.bias", (config.num_kv_heads * d,)
        yield f"{p}.self_attn.o_proj.weight", (h, config.num_heads * d)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        yield f"{p}.mlp.gate_proj.weight", (config.intermediate_size, h)
        yield f"{p}.mlp.up_proj.weight", (config.intermediate_size, h)
        yield f"{p}.mlp.down_proj.weight", (h, config.intermediate_size)
    yield "model.norm.weight", (h,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, h)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**63


def random_weights(
    config: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Lazily draw each tensor on `device` in `dtype`; one tensor is alive at a time."""
    import torch

    gen = torch.Generator(device=device)
    for name, shape in weight_shapes(config):
        gen.manual_seed(_tensor_seed(seed, name))
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.normal_(1.0, NORM_STD, generator=gen)
        else:
            t.normal_(0.0, INIT_STD, generator=gen)
        yield name, t


class SyntheticTokenizer:
    """Byte-level stand-in with the `TextTokenizer` interface the engine uses."""

    chat_template = None
    bos_token_id = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos = False

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"vocab of {vocab_size} cannot hold the 256 byte ids")
        self.vocab_size = vocab_size
        self.fingerprint = f"bytes/{vocab_size}"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        raise ChatTemplateError("random-weight models have no chat template; send token ids")
