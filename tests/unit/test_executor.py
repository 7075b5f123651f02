"""The executor seam without processes: the step message, the in-process executor, and
parallel state that belongs to a model instead of the process."""

from __future__ import annotations

import msgpack
import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import ParallelConfig
from pdserve.engine.executor.step import StepInput
from pdserve.engine.executor.uniproc import UniprocExecutor
from pdserve.engine.llm import engine_config
from pdserve.engine.loader import synthetic
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.parallel import SINGLE, ParallelContext, layers_per_stage
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence


def _seq(rid: str, n_prompt: int, computed: int, blocks: list[int]) -> Sequence:
    seq = Sequence(rid, list(range(100, 100 + n_prompt)), SamplingParams(), 0)
    seq.num_computed_tokens, seq.block_ids = computed, blocks
    return seq


def test_step_input_crosses_as_msgpack_and_keeps_what_ranks_need():
    batch = [
        ScheduledSeq(_seq("a", 20, 16, [3, 4, 5]), 4),  # the prompt's last chunk: samples
        ScheduledSeq(_seq("b", 40, 0, [7, 8, 9, 10, 11]), 16),  # a first chunk: no sample
    ]
    step = StepInput.from_batch(batch, block_size=8)
    assert step.token_ids == list(range(116, 120)) + list(range(100, 116))
    assert step.query_lens == [4, 16] and step.context_lens == [16, 0]
    assert step.block_tables == [[3, 4, 5], [7, 8]]  # only the blocks the step touches
    assert step.samples == [True, False]
    wire = msgpack.packb(step.to_plain(), use_bin_type=True)
    assert StepInput.from_plain(msgpack.unpackb(wire, raw=False)) == step


def test_a_step_splits_into_micro_batches_of_whole_sequences():
    step = StepInput([1, 2, 3, 4, 5, 6], [3, 1, 2], [0, 7, 4], [[0], [1, 2], [3]],
                     [True, True, False])
    a, b = step.split(2)
    assert (a.token_ids, a.query_lens, a.context_lens, a.block_tables, a.samples) == \
        ([1, 2, 3, 4], [3, 1], [0, 7], [[0], [1, 2]], [True, True])
    assert (b.token_ids, b.query_lens, b.samples) == ([5, 6], [2], [False])
    assert [s.num_seqs for s in step.split(5)] == [1, 1, 1]  # never an empty part


def test_inconsistent_step_input_is_refused():
    plain = [[1, 2, 3], [2], [0], [[0]], [True], None, 0]
    with pytest.raises(ValueError, match="inconsistent"):
        StepInput.from_plain(plain)
    with pytest.raises(ValueError):
        StepInput.from_plain({"token_ids": []})


def test_offline_engine_runs_through_the_in_process_executor():
    llm = LLM("random:tiny", num_blocks=16)
    ex = llm.engine.executor
    assert isinstance(ex, UniprocExecutor)
    assert llm.engine.runner is ex.worker.runner and llm.engine.kv_cache is ex.worker.kv_cache
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, min_tokens=3))
    assert len(out[0].token_ids) == 3
    llm.shutdown()  # nothing to release, and safe to call


def test_in_process_executor_refuses_a_tensor_parallel_config():
    with pytest.raises(ValueError, match="rank group"):
        UniprocExecutor(engine_config("random:tiny", tensor_parallel_size=2))
    with pytest.raises(ValueError, match="rank group"):
        UniprocExecutor(engine_config("random:tiny", pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="pipeline"):
        ParallelConfig(pipeline_parallel_size=0)


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stages_hold_their_layers_and_load_only_those(tied):
    from dataclasses import replace

    from pdserve.engine.models.llama import LlamaForCausalLM

    cfg = replace(synthetic.synthetic_config("random:tiny", torch.device("cpu"), torch.float32),
                  num_layers=3, tie_word_embeddings=tied)
    weights = dict(synthetic.random_weights(cfg, 0, torch.device("cpu"), torch.float32))
    first, last = (LlamaForCausalLM(cfg, parallel=ParallelContext(pp_rank=r, pp_size=2))
                   for r in (0, 1))
    for stage in (first, last):
        stage.load_weights(weights.items())  # refuses a stage missing one of its weights
    assert (first.first_layer, len(first.layers), last.first_layer, len(last.layers)) == \
        (0, 2, 2, 1)
    assert first.embed_tokens is not None and first.lm_head is None and first.norm is None
    assert last.embed_tokens is None and last.norm is not None
    # Stage 1's layer 0 is the model's layer 2; a tied head loads the embedding's weight.
    assert torch.equal(last.layers[0].mlp.down_proj.weight,
                       weights["model.layers.2.mlp.down_proj.weight"])
    head = weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert torch.equal(last.lm_head.weight, head)


def test_two_tp_layouts_live_in_one_process():
    """Parallel state belongs to each model: shards of rank 0 and 1 of a TP=2 split sit
    beside an unsplit model and together hold exactly its weights."""
    cfg = synthetic.synthetic_config("random:tiny", torch.device("cpu"), torch.float32)
    weights = dict(synthetic.random_weights(cfg, 0, torch.device("cpu"), torch.float32))
    splits = (SINGLE, ParallelContext(tp_rank=0, tp_size=2), ParallelContext(tp_rank=1, tp_size=2))
    models = [LlamaForCausalLM(cfg, parallel=p) for p in splits]
    for m in models:
        m.load_weights(weights.items())
    full, r0, r1 = (m.layers[0].mlp.down_proj.weight for m in models)
    assert torch.equal(torch.cat([r0, r1], dim=1), full)  # row-parallel: input features split
    assert models[1].layers[0].self_attn.num_kv_heads == 1
    assert models[0].layers[0].self_attn.num_kv_heads == 2


def test_parallel_context_checks_its_ranks_and_splits_layers_evenly():
    with pytest.raises(ValueError, match="rank 2"):
        ParallelContext(tp_rank=2, tp_size=2)
    assert layers_per_stage(30, 4) == (8, 8, 7, 7) and layers_per_stage(30, 1) == (30,)
    with pytest.raises(ValueError):
        layers_per_stage(2, 3)
