"""Tensor parallelism on CPU: a rank group (driver + followers, gloo) serves tiny random
Llamas and must produce the tokens of a single-process run, and HF transformers' greedy
tokens, exactly.

Each rank is a spawned process that joins the group (`engine.executor.group
.init_rank_group`, gloo over loopback TCP). Rank 0 is the driver: it builds the engine like
any user would (`LLM(path, rank_group=group)`), schedules, and broadcasts every step's
inputs; the other ranks only execute (`engine.executor.multiproc.Follower`): no scheduler.
The layers shard themselves, KV heads are split (or replicated when TP exceeds their
count), and logits are gathered on the driver.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rank_procs import free_port, join_all, start_ranks

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.kv_cache.block_hash import hash_blocks

PROMPT_LENS = (3, 8, 21, 45)  # sub-block, one block, across blocks, chunked (budget 16)
NEW_TOKENS = 8
ENGINE_ARGS = dict(block_size=8, max_num_batched_tokens=16, num_blocks=64)
# SmolLM2's head shape (9 query heads, 3 KV heads), scaled down, for a 3-way split.
TP3_SHAPE = dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=96, vocab_size=258)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def generate(llm: LLM) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                            logprobs=1)
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=NEW_TOKENS,
                            min_tokens=NEW_TOKENS)
    ps = prompts()
    outs = llm.generate(ps + ps[-1:], [greedy] * len(ps) + [seeded])
    eng = llm.engine
    return {
        "tokens": [o.token_ids for o in outs],
        "logprobs": [[lp.logprob for lp in o.logprobs] for o in outs],
        "kv_heads": eng.kv_cache.shape[-2],
        "blocks_back": eng.blocks.num_free_blocks == eng.blocks.num_blocks,
        "steps": eng.stats["steps"],
        "tp_size": eng.layout_key.tp_size,
        "hashes": [h.hex() for h in hash_blocks(ps[-1], eng.layout.block_size,
                                                eng.compat_key)],
    }


def _rank_main(rank: int, world: int, port: int, paths: list[str], out_dir: str) -> None:
    from pdserve.engine.executor.group import init_rank_group
    from pdserve.engine.executor.multiproc import Follower
    from pdserve.engine.llm import engine_config

    torch.set_num_threads(1)
    group = init_rank_group(rank, world, f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        results = []
        for path in paths:
            if group.is_driver:
                llm = LLM(path, rank_group=group, **ENGINE_ARGS)
                try:
                    results.append(generate(llm))
                finally:
                    llm.shutdown()
            else:
                config = engine_config(path, tensor_parallel_size=world, **ENGINE_ARGS)
                follower = Follower(config, group)
                steps = follower.run()
                results.append({"kv_heads": follower.worker.kv_cache.shape[-2], "steps": steps})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        group.destroy()


def run_ranks(world: int, paths: list[str], out_dir: Path,
              timeout_s: float = 300.0) -> list[list[dict]]:
    ctx = start_ranks(_rank_main, (world, free_port(), paths, str(out_dir)), world)
    join_all(ctx, timeout_s)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
    )
    return out[0, len(ids):].tolist()


def check_group(world: int, models: list[tuple[str, object]], ranks: list[list[dict]],
                kv_heads: int) -> None:
    """The driver's results equal a single process's and HF's; every rank cached only its
    own share of the KV heads (one head when TP exceeds their count: replicated);
    followers executed every step the driver scheduled."""
    for i, (path, hf) in enumerate(models):
        single = generate(LLM(path, **ENGINE_ARGS))
        assert single["kv_heads"] == kv_heads
        driver = ranks[0][i]
        for rank, results in enumerate(ranks):
            got = results[i]
            assert got["kv_heads"] == max(1, kv_heads // world), \
                f"rank {rank} should cache only its own KV heads"
        assert driver["tokens"] == single["tokens"], f"model {i}"
        for a, b in zip(driver["logprobs"], single["logprobs"]):
            assert all(abs(x - y) < 1e-4 for x, y in zip(a, b))
        assert driver["blocks_back"]
        for p, toks in zip(prompts(), driver["tokens"]):
            assert toks == hf_greedy(hf, p, NEW_TOKENS), f"model {i}, prompt of {len(p)}"
        # Block hashes carry the content key only: the TP layout does not change them.
        assert driver["tp_size"] == world and single["tp_size"] == 1
        assert driver["hashes"] == single["hashes"] and driver["hashes"]
        for rank, results in enumerate(ranks[1:], start=1):
            assert results[i]["steps"] == driver["steps"] > 0, f"follower {rank}"


def test_tp2_matches_single_process(tiny_model_factory, tmp_path, monkeypatch):
    # Untied LM head (vocab-parallel lm_head) and tied (SmolLM2-style, shared with the
    # embedding); 4 query heads and 2 KV heads, so each rank holds 2 and 1.
    untied = tiny_model_factory("llama", seed=21)
    tied = tiny_model_factory("llama", seed=22, tie_word_embeddings=True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    ranks = run_ranks(2, [untied[0], tied[0]], tmp_path)
    check_group(2, [untied, tied], ranks, kv_heads=2)


def test_tp3_matches_single_process(tiny_model_factory, tmp_path, monkeypatch):
    # 9 query heads, 3 KV heads (SmolLM2's grouping): each of 3 ranks holds 3 and 1.
    model = tiny_model_factory("llama", seed=23, tie_word_embeddings=True, **TP3_SHAPE)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ranks = run_ranks(3, [model[0]], tmp_path)
    check_group(3, [model], ranks, kv_heads=3)


def test_tp2_replicates_a_single_kv_head(tiny_model_factory, tmp_path, monkeypatch):
    # 4 query heads, 1 KV head: TP exceeds the KV-head count, so both ranks hold (and
    # write) that one head while each computes 2 of the query heads (as vLLM does).
    model = tiny_model_factory("llama", seed=24, num_key_value_heads=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ranks = run_ranks(2, [model[0]], tmp_path)
    check_group(2, [model], ranks, kv_heads=1)
