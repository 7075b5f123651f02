"""The offline API: `LLM(model).generate(prompts, params)`.

Requests are added together and the engine steps until all finish, so a list of prompts is
served with continuous batching and chunked prefill exactly as a worker would serve it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from pdserve.engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine, PromptInput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import TokenLogprob


@dataclass(slots=True)
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0


class LLM:
    """Generate text offline with the paged engine.

    `LLM("smollm2-135m-instruct", block_size=16, max_num_batched_tokens=512)`; keyword
    arguments are fields of `EngineConfig`, `CacheConfig`, `SchedulerConfig` or
    `ParallelConfig`. With `rank_group` (from `engine.executor.group.init_rank_group`, on
    rank 0) this process drives a tensor-parallel group whose other ranks run
    `engine.executor.multiproc.run_follower` with the same `engine_config(...)`.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", rank_group=None, **kwargs):
        if rank_group is not None:
            kwargs.setdefault("tensor_parallel_size", rank_group.parallel.tp_size)
            kwargs.setdefault("pipeline_parallel_size", rank_group.parallel.pp_size)
        config = engine_config(model, **kwargs)
        executor = None
        if rank_group is not None:
            from pdserve.engine.executor.multiproc import MultiprocExecutor

            executor = MultiprocExecutor(config, rank_group)
        self.engine = LLMEngine(config, executor=executor)
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        """Release a rank group's followers (nothing to do for a single process)."""
        self.engine.shutdown()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[CompletionOutput]:
        """Generate for one prompt or a list (text, chat message lists or token-id lists).

        All inputs are validated before any request starts, so a bad one raises ValueError
        and leaves the engine as it was.
        """
        prompts = _as_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        eng = self.engine
        ids = [eng.tokenize(p) for p in prompts]
        for i, p in zip(ids, params):
            p.validate_against(eng.model_config.vocab_size)
            eng.scheduler.check_fits(len(i), p.max_tokens)
        rids = [f"offline-{uuid.uuid4().hex}" for _ in prompts]
        outs = {r: CompletionOutput(r, i, [], "", "") for r, i in zip(rids, ids)}
        for r, i, p in zip(rids, ids, params):
            eng.add_request(r, i, p)
        bar = tqdm(total=len(rids), desc="generate", disable=not use_tqdm)
        try:
            while eng.has_unfinished():
                for o in eng.step():
                    c = outs[o.request_id]
                    c.token_ids += o.new_token_ids
                    c.text += o.new_text
                    c.logprobs += o.new_logprobs
                    if o.finished:
                        c.finish_reason = o.finish_reason
                        c.cached_tokens = o.cached_tokens
                        bar.update(1)
        except BaseException:
            for r in rids:
                eng.abort(r)
            raise
        finally:
            bar.close()
        return [outs[r] for r in rids]


def engine_config(model: str = "smollm2-135m-instruct", **kwargs) -> EngineConfig:
    """The `EngineConfig` that `LLM(model, **kwargs)` runs with (followers of a rank group
    build theirs with this, so that every rank holds a shard of the same model)."""
    groups = [(CacheConfig, "cache"), (SchedulerConfig, "scheduler"), (ParallelConfig, "parallel")]
    parts = {}
    for cls, name in groups:
        keys = set(cls.__dataclass_fields__)
        parts[name] = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in keys})
    return EngineConfig(model=model, **parts, **kwargs)


def _as_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one token-id prompt
    if prompts and isinstance(prompts[0], dict):
        return [prompts]  # one chat
    return list(prompts)
