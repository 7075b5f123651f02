"""Our engine against HF transformers on the real SmolLM2 weights (fp32, CPU)."""

from __future__ import annotations

import torch
from testkit import hf_greedy

from pdserve.engine import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Hi",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books "
    "about the stars. Every night the dragon would",
    "List three primary colors:",
    "Translate to French: I would like a cup of coffee, please.",
    "Q: What is the boiling point of water at sea level in Celsius?\nA:",
    "The quick brown fox jumps over the lazy dog. " * 6 + "The dog then",
]


def test_greedy_batch_matches_hf(llm, hf_model):
    """8 prompts of mixed length, one batch, chunked prefill (budget 40 < longest prompt),
    block size 8: every token equals HF's greedy output."""
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    outs = llm.generate(PROMPTS, params)
    lens = [len(o.prompt_token_ids) for o in outs]
    assert max(lens) > 40 and min(lens) < 8  # chunking and sub-block prompts both happen
    for o in outs:
        assert o.token_ids == hf_greedy(hf_model, o.prompt_token_ids, 32), o.prompt_token_ids
        assert o.finish_reason == "length"


def test_logprobs_match_hf_log_softmax(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5)
    (out,) = llm.generate([PROMPTS[3]], params)
    full = torch.tensor([out.prompt_token_ids + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(full).logits[0].float(), dim=-1)
    start = len(out.prompt_token_ids) - 1
    for i, lp in enumerate(out.logprobs):
        row = ref[start + i]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        top = torch.topk(row, 5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        for (_, got), want in zip(lp.top, top.values.tolist()):
            assert abs(got - want) < 1e-4


def test_prefix_cache_hit_gives_same_tokens(llm):
    system = "You are a careful assistant. Answer briefly and precisely. " * 3
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    first = llm.generate([system + "What is 2+2?"], params)[0]
    again = llm.generate([system + "What is 2+2?"], params)[0]
    assert again.cached_tokens >= 16
    assert again.token_ids == first.token_ids


def test_blocks_return_after_generate(llm):
    blocks = llm.engine.blocks
    start = blocks.num_free_blocks
    llm.generate(PROMPTS[:4], SamplingParams(temperature=0.8, seed=1, max_tokens=10))
    assert blocks.num_free_blocks == start == blocks.num_blocks
