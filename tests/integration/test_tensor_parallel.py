"""Tensor parallelism on CPU: two gloo ranks serve a tiny random Llama and must produce the
tokens of a single-process run exactly.

Each rank is a spawned process that sets up `torch.distributed` (gloo over loopback TCP),
declares its rank with `engine.parallel.init_tensor_parallel`, and then builds the engine
like any user would (`LLM(path)`): the layers shard themselves, KV heads are split, and
logits are gathered, so every rank samples the same tokens.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pdserve.engine import LLM, SamplingParams

TP = 2
PROMPT_LENS = (3, 8, 21, 45)  # sub-block, one block, across blocks, chunked (budget 16)
NEW_TOKENS = 8
ENGINE_ARGS = dict(block_size=8, max_num_batched_tokens=16, num_blocks=64)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def generate(path: str) -> dict:
    llm = LLM(path, **ENGINE_ARGS)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                            logprobs=1)
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=NEW_TOKENS,
                            min_tokens=NEW_TOKENS)
    ps = prompts()
    outs = llm.generate(ps + ps[-1:], [greedy] * len(ps) + [seeded])
    blocks = llm.engine.blocks
    return {
        "tokens": [o.token_ids for o in outs],
        "logprobs": [[lp.logprob for lp in o.logprobs] for o in outs],
        "kv_heads": llm.engine.kv_cache.shape[-2],
        "blocks_back": blocks.num_free_blocks == blocks.num_blocks,
    }


def _rank_main(rank: int, port: int, paths: list[str], out_dir: str) -> None:
    import torch.distributed as dist

    from pdserve.engine.parallel import init_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP
    )
    try:
        init_tensor_parallel(rank, TP)
        results = [generate(p) for p in paths]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(paths: list[str], out_dir: Path, timeout_s: float = 120.0) -> list[list[dict]]:
    ctx = mp.start_processes(
        _rank_main, args=(_free_port(), paths, str(out_dir)), nprocs=TP, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks still running after {timeout_s}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(TP)]


def test_tp2_matches_single_process(tiny_model_factory, tmp_path, monkeypatch):
    # Untied LM head (vocab-parallel lm_head) and tied (SmolLM2-style, shared with the
    # embedding); 4 query heads and 2 KV heads, so each rank holds 2 and 1.
    untied, _ = tiny_model_factory("llama", seed=21)
    tied, _ = tiny_model_factory("llama", seed=22, tie_word_embeddings=True)
    paths = [untied, tied]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    ranks = run_ranks(paths, tmp_path)
    for i, path in enumerate(paths):
        single = generate(path)
        assert single["kv_heads"] == 2
        for rank, results in enumerate(ranks):
            got = results[i]
            assert got["kv_heads"] == 1, f"rank {rank} should cache only its own KV head"
            assert got["tokens"] == single["tokens"], f"rank {rank}, model {i}"
            for a, b in zip(got["logprobs"], single["logprobs"]):
                assert all(abs(x - y) < 1e-4 for x, y in zip(a, b))
            assert got["blocks_back"]
