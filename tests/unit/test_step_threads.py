"""`engine.cpu_threads.StepThreads`: a CPU rank runs small steps on one thread and large
ones on all of its threads, and the tokens do not depend on it."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.cpu_threads import StepThreads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_rule_switches_only_across_the_threshold(two_threads):
    rule = StepThreads.for_rank(16)
    assert rule is not None and rule.threads == 2
    for tokens, want in [(1, 1), (16, 1), (17, 2), (512, 2), (3, 1)]:
        rule.before_step(tokens)
        assert torch.get_num_threads() == want, tokens
    assert StepThreads.for_rank(0) is None  # off
    torch.set_num_threads(1)
    assert StepThreads.for_rank(16) is None  # nothing to switch


def test_an_engine_decodes_on_one_thread_and_prefills_on_two_with_the_same_tokens(
        two_threads):
    prompt = list(range(1000, 1040))  # 40 tokens: a large step, then 1-row decode steps
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runs = {}
    for small in (16, 0):
        llm = LLM(num_threads=2, small_step_tokens=small, num_blocks=64)
        seen: list[tuple[int, int]] = []
        model = llm.engine.executor.worker.model
        hook = model.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append((args[0].numel(), torch.get_num_threads())))
        runs[small] = llm.generate([prompt], params)[0].token_ids
        hook.remove()
        want = [(40, 2)] + [(1, 1 if small else 2)] * 5
        assert seen == want, (small, seen)
    assert runs[16] == runs[0]


def test_a_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="small_step_tokens"):
        EngineConfig(small_step_tokens=-1)
