"""A rank group must fail loudly, never hang: a follower that dies or stops answering
mid-service makes the driver's next step raise `ExecutorError` within the collective
timeout (and every later step too), the failed requests' blocks come back — also from a
pipeline holding two steps in flight — and a follower holding another model is refused
at start-up.

Ranks are spawned processes (gloo over loopback), as in test_tensor_parallel.py; the test
process kills or stops the follower between two `generate` calls of the driver.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from rank_procs import free_port, kill_all, start_ranks

from pdserve.engine import LLM, SamplingParams

ENGINE_ARGS = dict(block_size=8, max_num_batched_tokens=16, num_blocks=64)
TIMEOUT_S = 5.0  # the group's collective timeout
PROMPT = list(range(3, 40))
# A pipeline keeps two steps in flight only over several sequences.
PP_PROMPTS = [PROMPT, list(range(50, 60)), list(range(70, 75))]
GREEDY = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear within {timeout_s}s")
        time.sleep(0.1)


def _rank_main(rank: int, port: int, driver_path: str, follower_path: str,
               out_dir: str, pp: bool) -> None:
    from pdserve.engine.executor.base import ExecutorError
    from pdserve.engine.executor.group import init_rank_group
    from pdserve.engine.executor.multiproc import run_follower
    from pdserve.engine.llm import engine_config

    torch.set_num_threads(1)
    out = Path(out_dir)
    group = init_rank_group(rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=TIMEOUT_S,
                            pp_size=2 if pp else 1)
    split = {"pipeline_parallel_size": 2} if pp else {"tensor_parallel_size": 2}
    if not group.is_driver:
        run_follower(engine_config(follower_path, **split, **ENGINE_ARGS), group)
        return
    prompts = PP_PROMPTS if pp else [PROMPT]
    result: dict = {}
    try:
        llm = LLM(driver_path, rank_group=group, **ENGINE_ARGS)
    except ExecutorError as e:
        result["start_error"] = str(e)
    else:
        result["first"] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        (out / "ready").touch()
        _wait_for(out / "go", 120)
        errors = []
        t0 = time.monotonic()
        for _ in range(2):  # the failing step, then one on the broken group
            try:
                llm.generate(prompts, GREEDY)
                errors.append(None)
            except ExecutorError as e:
                errors.append(str(e))
            result.setdefault("seconds", time.monotonic() - t0)
        blocks = llm.engine.blocks
        result.update(errors=errors, blocks_back=blocks.num_free_blocks == blocks.num_blocks,
                      overlapped=llm.engine.stats["overlapped_steps"])
    (out / "driver.json").write_text(json.dumps(result))
    os._exit(0)  # a clean teardown would wait on the dead peer


def _run(tmp_path: Path, driver_path: str, follower_path: str, fault=None,
         pp: bool = False) -> dict:
    ctx = start_ranks(_rank_main, (free_port(), driver_path, follower_path, str(tmp_path), pp),
                      2)
    driver, follower = ctx.processes
    try:
        if fault is not None:
            _wait_for(tmp_path / "ready", 180)
            os.kill(follower.pid, fault)
            (tmp_path / "go").touch()
        driver.join(180)
        assert driver.exitcode == 0, f"driver exited with {driver.exitcode}"
    finally:
        kill_all(ctx)  # SIGKILL also ends a stopped process
    return json.loads((tmp_path / "driver.json").read_text())


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> str:
    return tiny_model_factory("llama", seed=31)[0]


@pytest.mark.parametrize("pp", [False, True], ids=["tp2", "pp2-overlap"])
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_lost_follower_fails_the_step_within_the_timeout(tiny, tmp_path, monkeypatch, fault,
                                                         pp):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = _run(tmp_path, tiny, tiny, fault, pp)
    prompts = PP_PROMPTS if pp else [PROMPT]
    single = [o.token_ids for o in LLM(tiny, **ENGINE_ARGS).generate(prompts, GREEDY)]
    assert result["first"] == single  # the group worked before the fault
    assert (result["overlapped"] > 0) == pp  # a pipeline held two steps at once
    failed, again = result["errors"]
    assert failed and "rank group" in failed and "unusable" in failed
    assert again and "unusable" in again  # a broken group refuses every later step
    # A dead peer is seen at once; a silent one after the collective timeout, not never.
    assert result["seconds"] < 3 * TIMEOUT_S + 10
    assert result["blocks_back"]


def test_follower_with_another_model_is_refused_at_start(tiny, tiny_model_factory, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    other = tiny_model_factory("llama", seed=32)[0]  # same shape, other weights
    result = _run(tmp_path, tiny, other)
    assert "refused" in result["start_error"] and "content key" in result["start_error"]
