"""Our Llama model as an HF transformers model with the same weights — the reference side
of GPU correctness tests and benchmarks, where the weights are random (`random:<preset>`)
and exist only in our engine.

Only for tensor-parallel size 1 (the full weights are on this rank). `transformers` is
imported lazily: the engine never needs it to serve.
"""

from __future__ import annotations

import torch

from pdserve.engine.config import ModelConfig


def hf_llama_config(config: ModelConfig):
    """A `transformers.LlamaConfig` with our architecture (transformers >= 5 rope fields)."""
    import transformers

    rope: dict = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=config.attention_bias,
        bos_token_id=config.bos_token_id, eos_token_id=None, pad_token_id=None,
    )


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """HF names -> our tensors (views of the fused q|k|v and gate|up weights; no copies)."""
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
    }
    if not model.config.tie_word_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        for fused, names in ((attn.qkv_proj, ("q", "k", "v")), (mlp.gate_up_proj, ("gate", "up"))):
            prefix = "self_attn" if fused is attn.qkv_proj else "mlp"
            for part in names:
                start, n = fused.offsets[part]
                sd[f"{p}.{prefix}.{part}_proj.weight"] = fused.weight[start : start + n]
                if fused.bias is not None:
                    sd[f"{p}.{prefix}.{part}_proj.bias"] = fused.bias[start : start + n]
        sd[f"{p}.self_attn.o_proj.weight"] = attn.o_proj.weight
        sd[f"{p}.mlp.down_proj.weight"] = mlp.down_proj.weight
        sd[f"{p}.input_layernorm.weight"] = layer.input_layernorm.weight
        sd[f"{p}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return sd


def hf_model_like(model, config: ModelConfig, attn_implementation: str = "sdpa"):
    """An HF `LlamaForCausalLM` on our model's device and dtype, holding a copy of its
    weights (HF's own init runs first; its tensors are then overwritten)."""
    import transformers

    weight = model.embed_tokens.weight
    hf_config = hf_llama_config(config)
    hf_config._attn_implementation = attn_implementation
    prev = torch.get_default_dtype()
    torch.set_default_dtype(weight.dtype)
    try:
        with torch.device(weight.device):
            hf = transformers.LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(prev)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


@torch.inference_mode()
def teacher_forced_logprobs(hf, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """HF's log-probabilities `[len(completion), vocab]` (fp32) at each completion position,
    given the prompt and our completion tokens before it."""
    ids = torch.tensor([prompt + completion], device=hf.device)
    logits = hf(ids).logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def closeness_violations(
    tokens: list[int], tops: list[list[int]], ref_logprobs: torch.Tensor, k: int = 5
) -> list[str]:
    """DESIGN.md's rule for bf16: wherever our greedy token differs from the reference's
    argmax, each side's choice must be in the other side's top-k. `tops[i]` is our top-k
    ids at position i; `ref_logprobs` comes from `teacher_forced_logprobs`."""
    bad = []
    ref_top = ref_logprobs.topk(k, dim=-1).indices.tolist()
    for i, (tok, ours) in enumerate(zip(tokens, tops)):
        best = ref_top[i][0]
        if tok != best and (tok not in ref_top[i] or best not in ours[:k]):
            bad.append(f"position {i}: ours {tok} (top {ours[:k]}), reference top {ref_top[i]}")
    return bad
