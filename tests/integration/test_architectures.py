"""Llama 3.1 (llama3 rope scaling), Qwen2 (qkv bias) and Mistral against HF transformers.

No weights for these ship here, so each is a tiny seeded random model built with
transformers' own classes and saved as an HF directory (see conftest.py); our engine loads
that directory and must produce HF's greedy tokens exactly and its log-probabilities
within 1e-4, in fp32, for prompts given as token ids.
"""

from __future__ import annotations

import json

import pytest
import torch
from testkit import hf_greedy

from pdserve.engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
ARCHS = {
    # 32k positions: well past original_max_position_embeddings, as in real Llama 3.1.
    "llama3.1": ("llama", {"max_position_embeddings": 32768, "rope_parameters": LLAMA31_ROPE}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
}
PROMPT_LENS = (1, 5, 37, 150)  # below, at and across block boundaries; the last is chunked
NEW_TOKENS = 10


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tiny_model_factory):
    """(our LLM, HF model) on the same weights; small blocks and budget force chunking."""
    arch, overrides = ARCHS[request.param]
    path, hf = tiny_model_factory(arch, **overrides)
    llm = LLM(path, block_size=8, max_num_batched_tokens=64, num_blocks=512)
    return llm, hf


def test_config_read_from_hf_directory(pair):
    llm, hf = pair
    mc = llm.engine.model_config
    assert (mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (2, 4, 2, 16)
    assert mc.attention_bias == (hf.config.model_type == "qwen2")
    if hf.config.model_type == "qwen2":
        assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # biases matter
    if hf.config.model_type == "llama":
        assert mc.rope_scaling is not None and mc.rope_scaling.factor == 8.0


def test_greedy_tokens_match_hf(pair):
    llm, hf = pair
    ps = prompts()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outs = llm.generate(ps, params)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, NEW_TOKENS, pad_token_id=0), \
            f"prompt of {len(p)} tokens"
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_logprobs_match_hf(pair):
    llm, hf = pair
    ps = prompts(seed=2)[1:3]
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5))
    for p, o in zip(ps, outs):
        ref = hf_log_softmax(hf, p + o.token_ids)
        for i, lp in enumerate(o.logprobs):
            row = ref[len(p) - 1 + i]
            assert lp.token_id == o.token_ids[i] == int(row.argmax())
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            top = row.topk(5)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            for (_, got), want in zip(lp.top, top.values.tolist()):
                assert abs(got - want) < 1e-4


# --- Llama 3.1 rope scaling at long positions ---------------------------------------------


def test_llama31_rope_tables_match_hf_at_long_positions(tiny_model_factory):
    """Our cos/sin equal HF's at positions far past the original 8k context, where the
    scaled (low) frequencies dominate — and they really are scaled."""
    import transformers

    from pdserve.engine.config import ModelConfig, RopeScaling
    from pdserve.engine.layers.norm_rope import RotaryEmbedding

    _, hf = tiny_model_factory("llama", **ARCHS["llama3.1"][1])
    scaling = RopeScaling(8.0, 1.0, 4.0, 8192)
    common = dict(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=32768, rope_theta=500000.0)
    ours = RotaryEmbedding(ModelConfig(**common, rope_scaling=scaling))
    plain = RotaryEmbedding(ModelConfig(**common))
    positions = torch.tensor([0, 1, 2047, 4096, 8191, 8192, 12000, 20000, 32767])
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf.config)
    x = torch.zeros(1, len(positions), 16)
    cos, sin = ref(x, positions.unsqueeze(0))
    torch.testing.assert_close(ours.cos[positions], cos[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.sin[positions], sin[0], rtol=0, atol=1e-5)
    assert (ours.cos[positions] - plain.cos[positions]).abs().max() > 0.5


def test_llama31_long_prompt_matches_hf(tiny_model_factory):
    """A 2600-token prompt: attention spans distances where unscaled and scaled low
    frequencies rotate keys very differently; tokens and logprobs still equal HF's."""
    path, hf = tiny_model_factory("llama", seed=3, **ARCHS["llama3.1"][1])
    llm = LLM(path, max_num_batched_tokens=1024, num_blocks=200)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (2600,), generator=g).tolist()
    (out,) = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, min_tokens=6))
    assert out.token_ids == hf_greedy(hf, ids, 6, pad_token_id=0)
    (lp_out,) = llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, logprobs=1))
    assert lp_out.cached_tokens > 0  # the second run reused the cached prefix
    ref = hf_log_softmax(hf, ids + lp_out.token_ids)
    for i, lp in enumerate(lp_out.logprobs):
        assert abs(lp.logprob - ref[len(ids) - 1 + i, lp.token_id].item()) < 1e-4


# --- Mistral sliding window ------------------------------------------------------------------


def test_mistral_sliding_window_is_never_silently_ignored(tiny_model_factory):
    """HF Mistral attends only to the last `sliding_window` positions; within the window
    we match it, and a request that would reach past it is refused, naming both numbers,
    rather than answered with full attention."""
    path, hf = tiny_model_factory("mistral", seed=4, sliding_window=24)
    llm = LLM(path, block_size=8, num_blocks=64)
    ids = prompts()[2][:16]
    (out,) = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, min_tokens=8))
    # 16 + 8 = 24 positions: all in the window
    assert out.token_ids == hf_greedy(hf, ids, 8, pad_token_id=0)
    with pytest.raises(ValueError) as e:
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=9))
    assert "16" in str(e.value) and "9" in str(e.value) and "24" in str(e.value)


# --- loader errors and identity ------------------------------------------------------------


def test_unsupported_architecture_is_named(tmp_path, tiny_model_factory):
    import transformers

    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    for path in (tmp_path / "gpt2", config_only):
        with pytest.raises(ValueError) as e:
            LLM(str(path))
        assert "GPT2LMHeadModel" in str(e.value)
        assert "LlamaForCausalLM" in str(e.value)  # and what is supported


def test_different_weights_of_the_same_shape_get_different_compat_keys(tiny_model_factory):
    """Two fine-tunes of one base model have identical shapes; their KV must never be
    exchanged, so their compatibility keys (and block hashes) must differ."""
    a_path, _ = tiny_model_factory("qwen2", seed=10)
    b_path, _ = tiny_model_factory("qwen2", seed=11)
    again_path, _ = tiny_model_factory("qwen2", seed=10)
    a = LLM(a_path, num_blocks=8).engine.compat_key
    b = LLM(b_path, num_blocks=8).engine.compat_key
    again = LLM(again_path, num_blocks=8).engine.compat_key
    assert a != b
    assert a == again  # the same weights in another directory: same key
