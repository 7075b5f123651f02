"""Random-weight models of real shapes (`random:<preset>`): deterministic weights, a working
byte-level tokenizer, the engine end to end, and HF transformers holding the same weights."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.loader import synthetic
from pdserve.engine.loader.registry import open_model


def _weights(name: str) -> dict[str, torch.Tensor]:
    return dict(open_model(name).weights)


def test_presets_have_the_real_shapes():
    cfg = synthetic.synthetic_config("random:llama-3.1-8b", torch.device("cuda"), torch.bfloat16)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (4096, 32, 32, 8)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (14336, 128256, 128)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0
    assert cfg.max_position_embeddings == 131072 and not cfg.tie_word_embeddings
    n = sum(torch.Size(s).numel() for _, s in synthetic.weight_shapes(cfg))
    assert 8.0e9 < n < 8.1e9  # Llama-3.1-8B has 8.03 B parameters
    assert cfg.revision == "random:llama-3.1-8b@0/cuda/bfloat16"
    small = synthetic.synthetic_config("random:smollm2-135m@3", torch.device("cpu"),
                                       torch.float32)
    assert small.tie_word_embeddings and small.revision == "random:smollm2-135m@3/cpu/float32"


def test_weights_are_seeded_per_tensor_and_finite():
    a, b, c = _weights("random:tiny"), _weights("random:tiny@0"), _weights("random:tiny@1")
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.isfinite(a[name]).all()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           c["model.layers.0.mlp.up_proj.weight"])
    w = a["model.layers.1.self_attn.q_proj.weight"]
    assert w.dtype == torch.float32 and 0.015 < w.std().item() < 0.025


def test_unknown_preset_and_bad_seed_are_clear_errors():
    with pytest.raises(ValueError, match="presets: .*llama-3.1-8b"):
        open_model("random:gpt-5")
    with pytest.raises(ValueError, match="seed"):
        open_model("random:tiny@abc")


@pytest.fixture(scope="module")
def tiny_llm():
    return LLM("random:tiny", block_size=8, num_blocks=64, max_num_seqs=8)


def test_engine_generates_from_token_ids_and_text(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=6)
    ids_out, text_out = tiny_llm.generate([[5, 300, 7, 9], "hi"], params)
    assert len(ids_out.token_ids) == 6 and ids_out.finish_reason == "length"
    assert ids_out.text == "".join(f"<{t}>" for t in ids_out.token_ids)
    assert text_out.prompt_token_ids == [104, 105]  # UTF-8 bytes of "hi"
    again = LLM("random:tiny", block_size=8, num_blocks=64).generate([[5, 300, 7, 9]], params)
    assert again[0].token_ids == ids_out.token_ids  # same seed, same model
    engine = tiny_llm.engine
    assert engine.runner.decode_graphs is None  # CUDA graphs are a no-op on CPU
    assert engine.model.rope.cos.shape[0] == engine.max_model_len == 1024


def test_same_weights_in_hf_give_the_same_greedy_tokens(tiny_llm):
    pytest.importorskip("transformers")
    from pdserve.engine.loader.hf_export import hf_model_like

    engine = tiny_llm.engine
    hf = hf_model_like(engine.model, engine.model_config)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12)
    for prompt, out in zip(prompts, tiny_llm.generate(prompts, params)):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()
