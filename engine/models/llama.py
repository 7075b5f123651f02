"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) over a paged KV cache.

One flattened batch of `T` tokens goes through `forward(input_ids, positions)`; attention
reads its per-step metadata from `engine.forward_context`. Tensor parallelism lives in the
layers (`engine.layers.linear`): this file only says which projection is column- or
row-parallel, and hands every layer the `ParallelContext` the model was built with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine import forward_context
from pdserve.engine.config import ModelConfig
from pdserve.engine.layers.linear import (
    MergedColumnLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    dense,
)
from pdserve.engine.layers.norm_rope import RMSNorm, RotaryEmbedding
from pdserve.engine.parallel import SINGLE, ParallelContext, kv_heads_of_rank, layers_per_stage


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads // parallel.tp_size
        # Replicated on several ranks when TP exceeds the KV-head count (one head a rank).
        self.num_kv_heads = kv_heads_of_rank(config.num_kv_heads, parallel.tp_size,
                                             parallel.tp_rank)[1]
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.rope = rope
        d = config.head_dim
        self.qkv_proj = MergedColumnLinear(
            config.hidden_size,
            {"q": config.num_heads * d, "k": config.num_kv_heads * d, "v": config.num_kv_heads * d},
            bias=config.attention_bias,
            dtype=dtype,
            parallel=parallel,
            slices={"k": config.num_kv_heads, "v": config.num_kv_heads},
        )
        self.o_proj = RowParallelLinear(config.num_heads * d, config.hidden_size, dtype, parallel)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx = forward_context.current()
        t = x.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_cache[self.layer_idx, 0], ctx.kv_cache[self.layer_idx, 1]
        if ctx.wait_for_layer is not None:
            ctx.wait_for_layer(self.layer_idx)
        q = self.rope_write_kv(ctx, positions, q, k, v, k_cache, v_cache)
        if ctx.on_layer_written is not None:
            ctx.on_layer_written(self.layer_idx)
        out = ctx.backend.forward(q, k_cache, v_cache, ctx.meta, self.scale)
        return self.o_proj(out.reshape(t, q_size))

    def rope_write_kv(self, ctx, positions, q, k, v, k_cache, v_cache) -> torch.Tensor:
        """Rotate q and k, store k and v in this layer's cache; returns the rotated q.
        (`engine.models.fused_llama` overrides this with one fused kernel.)"""
        q, k = self.rope(positions, q, k)
        ctx.backend.write_kv(k, v, k_cache, v_cache, ctx.meta.slot_mapping)
        return q


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype, parallel: ParallelContext = SINGLE):
        super().__init__()
        n = config.intermediate_size
        self.gate_up_proj = MergedColumnLinear(
            config.hidden_size, {"gate": n, "up": n}, bias=False, dtype=dtype, parallel=parallel
        )
        self.down_proj = RowParallelLinear(n, config.hidden_size, dtype, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, layer_idx, rope, dtype, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, dtype, parallel)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Embedding -> decoder layers -> final norm; `compute_logits` applies the LM head.

    `parallel` says which tensor-parallel shard of every weight this instance holds, and
    which pipeline stage: a stage holds only its layers (`layers_per_stage`; layer j of the
    stage is the model's layer `first_layer + j`, and its KV pool's layer j), the first
    stage also the embedding, the last one the final norm and the LM head (a tied head
    loads the embedding's weight there).
    """

    def __init__(self, config: ModelConfig, dtype=torch.float32,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.rope = RotaryEmbedding(config)
        sizes = layers_per_stage(config.num_layers, parallel.pp_size)
        self.first_layer = sum(sizes[:parallel.pp_rank])
        self.num_stage_layers = sizes[parallel.pp_rank]
        self.is_first = parallel.pp_rank == 0
        self.is_last = parallel.pp_rank == parallel.pp_size - 1

        def vocab() -> VocabParallelEmbedding:
            return VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, parallel)

        self.embed_tokens = vocab() if self.is_first else None
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, j, self.rope, dtype, parallel)
            for j in range(self.num_stage_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype) \
            if self.is_last else None
        self.lm_head = None
        if self.is_last:
            tied_here = config.tie_word_embeddings and self.is_first
            self.lm_head = self.embed_tokens if tied_here else vocab()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's part: from `input_ids` on the first stage, else from the previous
        stage's `hidden`; the last stage returns normed hidden states."""
        x = self.embed_tokens(input_ids) if self.is_first else hidden
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x) if self.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather_last_dim(dense(hidden, self.lm_head.weight))

    # ---- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into this rank's (possibly sharded) parameters."""
        fused = {
            "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
            "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
        }
        seen: set[str] = set()
        for name, full in weights:
            name = self._stage_name(name.removeprefix("model."))
            if name is None:
                continue
            *path, proj, kind = name.split(".")
            module_path, part = path + [proj], None
            if proj in fused:
                module_path, part = path + [fused[proj][0]], fused[proj][1]
            module = self.get_submodule(".".join(module_path))
            full = full.to(module.weight.dtype)
            if isinstance(module, MergedColumnLinear):
                module.load(full, part or "all", is_bias=kind == "bias")
            elif isinstance(module, RMSNorm):
                module.weight.data.copy_(full)
            else:
                module.load(full)
            seen.add(".".join(module_path) + (f":{part}" if part else "") + f".{kind}")
        expected = self._expected_weights()
        missing = expected - seen
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")

    def _stage_name(self, name: str) -> str | None:
        """Where an HF-named weight goes on this stage (None: not held here)."""
        if "rotary_emb" in name:
            return None
        if name.startswith("lm_head"):
            return name if self.is_last and not self.config.tie_word_embeddings else None
        if name.startswith("embed_tokens"):
            if self.is_first:
                return name
            tied_head = self.is_last and self.config.tie_word_embeddings
            return name.replace("embed_tokens", "lm_head") if tied_head else None
        if name.startswith("norm."):
            return name if self.is_last else None
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            j = int(i) - self.first_layer
            return f"layers.{j}.{rest}" if 0 <= j < self.num_stage_layers else None
        return name

    def _expected_weights(self) -> set[str]:
        names = set()
        if self.is_first:
            names.add("embed_tokens.weight")
        if self.is_last:
            names.add("norm.weight")
            if not (self.config.tie_word_embeddings and self.is_first):
                names.add("lm_head.weight")
        for i in range(self.num_stage_layers):
            p = f"layers.{i}"
            names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                      f"{p}.self_attn.o_proj.weight", f"{p}.mlp.down_proj.weight",
                      f"{p}.mlp.gate_up_proj:gate.weight", f"{p}.mlp.gate_up_proj:up.weight"}
            for part in "qkv":
                names.add(f"{p}.self_attn.qkv_proj:{part}.weight")
                if self.config.attention_bias:
                    names.add(f"{p}.self_attn.qkv_proj:{part}.bias")
        return names
