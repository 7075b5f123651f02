"""The engine on CUDA with random weights of real shapes: CUDA-graph decode against eager,
fused kernels against the reference layers, and bf16 output against HF transformers running
the same weights (DESIGN.md's logprob-closeness rule).

`random:smollm2-135m` (30 layers, 9 heads / 3 KV heads: GQA groups of 3) keeps it quick.
In fp32 every path must give identical greedy tokens: rounding differences between graph
and eager (padded GEMM shapes, another split plan) are ~1e-7 and cannot flip an argmax in
practice. In bf16 they can, on random weights whose logits are nearly flat, so there the
closeness rule applies.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

from pdserve.engine import LLM, SamplingParams  # noqa: E402
from pdserve.engine.loader.hf_export import (  # noqa: E402
    closeness_violations,
    hf_model_like,
    teacher_forced_logprobs,
)

MODEL = "random:smollm2-135m"
NEW_TOKENS = 16
BATCH_SIZES = [1, 3, 8, 13, 24]  # 3 and 13 are padded to buckets 4 and 16


def make_llm(dtype: str, graphs: bool, fused: bool) -> LLM:
    return LLM(MODEL, dtype=dtype, device="cuda", block_size=16, num_blocks=2048,
               max_num_seqs=32, max_num_batched_tokens=4096, max_model_len=4096,
               enable_cuda_graphs=graphs, enable_fused_kernels=fused)


def prompts_for(batch: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 300, (batch,), generator=gen).tolist()
    if batch == 8:
        lens[2] = 2040  # decodes across the 2k context bucket
    return [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in lens]


def generate(llm: LLM, prompts, logprobs: int | None = None):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=logprobs)
    return llm.generate(prompts, params)


@pytest.fixture(scope="module")
def fp32_llms():
    return {
        "eager": make_llm("float32", graphs=False, fused=False),
        "eager+fused": make_llm("float32", graphs=False, fused=True),
        "graphs+fused": make_llm("float32", graphs=True, fused=True),
    }


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_fp32_graph_and_fused_decode_equal_eager(fp32_llms, batch):
    prompts = prompts_for(batch, seed=batch)
    graphs = fp32_llms["graphs+fused"].engine.runner.decode_graphs
    assert graphs is not None
    before = graphs.replays
    want = [o.token_ids for o in generate(fp32_llms["eager"], prompts)]
    for name in ("eager+fused", "graphs+fused"):
        got = [o.token_ids for o in generate(fp32_llms[name], prompts)]
        assert got == want, name
    assert graphs.replays - before >= NEW_TOKENS - 1  # decode really ran from graphs
    for llm in fp32_llms.values():
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.fixture(scope="module")
def bf16_graph_llm():
    return make_llm("bfloat16", graphs=True, fused=True)


def test_bf16_graph_decode_close_to_eager(bf16_graph_llm):
    eager = make_llm("bfloat16", graphs=False, fused=True)
    prompts = prompts_for(13, seed=7) + prompts_for(8, seed=8)
    a = generate(bf16_graph_llm, prompts, logprobs=5)
    b = generate(eager, prompts, logprobs=5)
    identical = 0
    for x, y in zip(a, b):
        if x.token_ids == y.token_ids:
            identical += 1
            continue
        j = next(i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) if s != t)
        # First divergence: each side's token is in the other's top-5 (later tokens differ
        # because their contexts do).
        assert x.token_ids[j] in [t for t, _ in y.logprobs[j].top], (j, x.logprobs[j])
        assert y.token_ids[j] in [t for t, _ in x.logprobs[j].top], (j, y.logprobs[j])
    assert identical >= len(prompts) // 2, f"only {identical}/{len(prompts)} identical"


def test_bf16_engine_close_to_hf_with_same_weights(bf16_graph_llm):
    engine = bf16_graph_llm.engine
    hf = hf_model_like(engine.model, engine.model_config)
    prompts = prompts_for(8, seed=11)
    bad, agree, total, max_diff = [], 0, 0, 0.0
    for prompt, out in zip(prompts, generate(bf16_graph_llm, prompts, logprobs=5)):
        ref = teacher_forced_logprobs(hf, prompt, out.token_ids)
        tops = [[t for t, _ in lp.top] for lp in out.logprobs]
        bad += closeness_violations(out.token_ids, tops, ref)
        agree += sum(t == r for t, r in zip(out.token_ids, ref.argmax(-1).tolist()))
        total += len(out.token_ids)
        for i, lp in enumerate(out.logprobs):
            max_diff = max(max_diff, abs(lp.logprob - ref[i, lp.token_id].item()))
    print(f"bf16 vs HF: {agree}/{total} greedy tokens equal, max logprob diff {max_diff:.4f}")
    assert not bad, bad
    assert max_diff < 0.1


def test_fp32_rope_write_kv_fusion_on_equals_off(fp32_llms):
    """The fused RoPE + K/V write kernel (default) against RoPE and write_kv as two
    kernels, both under CUDA graphs: the same arithmetic, so the same tokens."""
    from pdserve.engine.cuda_graph import DecodeGraphRunner
    from pdserve.engine.models.fused_llama import (
        set_rope_write_kv_fusion,
        uses_rope_write_kv_fusion,
    )

    llm = fp32_llms["graphs+fused"]
    engine = llm.engine
    assert uses_rope_write_kv_fusion(engine.model)
    prompts = prompts_for(13, seed=21)
    on = [o.token_ids for o in generate(llm, prompts)]
    set_rope_write_kv_fusion(engine.model, False)
    saved = engine.runner.decode_graphs
    try:
        engine.runner.decode_graphs = DecodeGraphRunner.maybe_create(
            engine.runner, engine.max_model_len, engine.config.scheduler.max_num_seqs)
        off = [o.token_ids for o in generate(llm, prompts)]
    finally:
        set_rope_write_kv_fusion(engine.model, True)
        engine.runner.decode_graphs = saved
    assert on == off
    assert on == [o.token_ids for o in generate(fp32_llms["eager"], prompts)]
