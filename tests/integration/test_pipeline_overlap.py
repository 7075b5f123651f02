"""Pipeline overlap across steps on CPU: a two-stage rank group (driver = stage 0, one
follower = stage 1, gloo over loopback) keeps two steps in flight, each over other
sequences, and must still give a single process's tokens and HF transformers' greedy
tokens exactly, with overlap on and off; an abort of a sequence whose step is in flight
frees its blocks once the step lands.

Each rank is a spawned process (`rank_procs`); the driver builds its engine like any user
(`LLM(path, rank_group=group, pipeline_overlap=...)`), the follower only executes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rank_procs import free_port, join_all, start_ranks
from testkit import hf_greedy

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.executor.step import StepInput

PROMPT_LENS = (3, 8, 11, 21)  # sub-block, one block, across blocks, chunked (budget 16)
NEW_TOKENS = 6
ENGINE_ARGS = dict(block_size=8, max_num_batched_tokens=16, num_blocks=64)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in PROMPT_LENS]


def generate(llm: LLM) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=NEW_TOKENS,
                            min_tokens=NEW_TOKENS)
    ps = prompts()
    eng = llm.engine
    before = dict(eng.stats)
    outs = llm.generate(ps + ps[:1], [greedy] * len(ps) + [seeded])
    return {
        "tokens": [o.token_ids for o in outs],
        "blocks_back": eng.blocks.num_free_blocks == eng.blocks.num_blocks,
        "overlapped": eng.stats["overlapped_steps"] - before["overlapped_steps"],
    }


def abort_in_flight(llm: LLM) -> dict:
    """Abort a sequence while a step over it is in flight: it is not freed before the step
    lands, produces nothing after the abort, and every block comes back."""
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    for i, p in enumerate(prompts()):
        eng.add_request(f"r{i}", p, params)
    victim, aborted, kept, outputs_after, steps = None, False, False, [], 0
    while eng.has_unfinished() and steps < 200:
        outs = eng.step()
        steps += 1
        if victim is not None:
            outputs_after += [o.request_id for o in outs if o.request_id == victim]
            continue
        flying = [f"r{i}" for i in range(len(PROMPT_LENS))
                  if (s := eng.sequence(f"r{i}")) is not None and s.in_flight
                  and s.num_output_tokens >= 2]
        if flying:
            victim = flying[0]
            seq = eng.sequence(victim)
            blocks = list(seq.block_ids)
            aborted = eng.abort(victim)
            kept = seq.block_ids == blocks and bool(blocks)  # still held: its step runs
    return {"victim": victim, "aborted": aborted, "kept_until_landed": kept,
            "outputs_after": outputs_after, "finished": not eng.has_unfinished(),
            "blocks_back": eng.blocks.num_free_blocks == eng.blocks.num_blocks}


def two_steps_in_flight(llm: LLM) -> dict:
    """Executor level: two prompt steps over disjoint blocks submitted before either is
    collected give the logits they give one at a time."""
    ex = llm.engine.executor
    ps = prompts()
    a = StepInput(ps[1], [len(ps[1])], [0], [[0]], [True])
    b = StepInput(ps[2], [len(ps[2])], [0], [[1, 2]], [True])
    ha = ex.submit(a)
    hb = ex.submit(b)
    pending = ha.output is None and hb.output is None  # neither waited for its logits
    la, lb = ex.collect(ha).logits.clone(), ex.collect(hb).logits.clone()
    sa, sb = ex.execute_model(a).logits.clone(), ex.execute_model(b).logits.clone()
    return {"max_in_flight": ex.max_in_flight, "pending": pending,
            "equal": torch.allclose(la, sa, atol=1e-5) and torch.allclose(lb, sb, atol=1e-5),
            "submitted": ex._step_id}


def _rank_main(rank: int, port: int, path: str, out_dir: str) -> None:
    from pdserve.engine.executor.group import init_rank_group
    from pdserve.engine.executor.multiproc import Follower
    from pdserve.engine.llm import engine_config

    torch.set_num_threads(1)
    group = init_rank_group(rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=60, pp_size=2)
    try:
        results = []
        for overlap in (True, False):
            if group.is_driver:
                llm = LLM(path, rank_group=group, pipeline_overlap=overlap, **ENGINE_ARGS)
                try:
                    got = {"executor": two_steps_in_flight(llm)} if overlap else {}
                    got["generate"] = generate(llm)
                    if overlap:
                        got["abort"] = abort_in_flight(llm)
                    got["steps"] = llm.engine.executor._step_id
                    results.append(got)
                finally:
                    llm.shutdown()
            else:
                config = engine_config(path, pipeline_parallel_size=2, **ENGINE_ARGS)
                results.append({"steps": Follower(config, group).run()})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        group.destroy()


def test_pp2_overlapped_steps_equal_single_process_and_hf(tiny_model_factory, tmp_path,
                                                           monkeypatch):
    path, hf = tiny_model_factory("llama", seed=61, num_hidden_layers=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    ctx = start_ranks(_rank_main, (free_port(), path, str(tmp_path)), 2)
    join_all(ctx, 300)
    driver, follower = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    on, off = driver
    single = generate(LLM(path, **ENGINE_ARGS))
    # Two steps in flight on the executor give the logits of one at a time.
    assert on["executor"] == {"max_in_flight": 2, "pending": True, "equal": True,
                              "submitted": 4}
    # The engine kept two steps in flight (with overlap only), and the tokens did not
    # change: greedy and seeded equal a single process's; greedy equal HF's.
    assert on["generate"]["overlapped"] > 0 and off["generate"]["overlapped"] == 0
    assert on["generate"]["tokens"] == off["generate"]["tokens"] == single["tokens"]
    for p, toks in zip(prompts(), on["generate"]["tokens"]):
        assert toks == hf_greedy(hf, p, NEW_TOKENS), f"prompt of {len(p)}"
    assert on["generate"]["blocks_back"] and off["generate"]["blocks_back"]
    # An abort while the sequence's step was in flight waited for it, then freed all.
    ab = on["abort"]
    assert ab["victim"] is not None and ab["aborted"] and ab["kept_until_landed"]
    assert ab["outputs_after"] == [] and ab["finished"] and ab["blocks_back"]
    # The follower ran every step the driver submitted, in order.
    assert [f["steps"] for f in follower] == [d["steps"] for d in driver]
