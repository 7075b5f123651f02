"""The engine core: model + KV pool + scheduler + sampler + detokeniser, stepped by callers.

`LLMEngine.step()` runs one scheduled batch and returns what each touched request produced
since the last step. The model itself runs behind an `Executor` (`engine.executor`): in
this process by default, or over a tensor-parallel rank group whose driver this engine is.
The offline `LLM` drives it in a loop; workers drive it from their own loops and use its
parts (`scheduler`, `blocks`, `runner`, `kv_cache`) directly.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.engine.detokenizer import Detokenizer
from pdserve.engine.executor.base import Executor
from pdserve.engine.executor.step import StepInput
from pdserve.engine.executor.uniproc import UniprocExecutor
from pdserve.engine.kv_cache.block_manager import BlockManager
from pdserve.engine.sampler import Sampler, SampleRequest, SampleResult
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq, Scheduler
from pdserve.engine.sequence import FinishReason, TokenLogprob
from pdserve.engine.sequence import Sequence as Seq

log = logging.getLogger("pdserve.engine")

PromptInput = str | Sequence[int] | Sequence[dict]
LayerHookFactory = Callable[[list[ScheduledSeq]], Callable[[int], None] | None]


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step (deltas), plus totals when it finishes."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class LLMEngine:
    """One model replica: the scheduler and sampler here, the model behind `executor`."""

    def __init__(self, config: EngineConfig, hold_blocks_on_finish: bool = False,
                 executor: Executor | None = None):
        """`executor` runs the model steps (default: `UniprocExecutor(config)`, the whole
        model in this process); a `MultiprocExecutor` makes this the driver of a rank
        group."""
        t0 = time.perf_counter()
        self.config = config
        self.executor = executor if executor is not None else UniprocExecutor(config)
        rank = self.executor.worker  # this process's rank: its model shard, KV pool, runner
        self.device = rank.device
        self.model_config = mc = rank.model_config
        self.tokenizer = rank.tokenizer
        self.max_model_len = rank.max_model_len
        self.model = rank.model
        self.runner = rank.runner
        self.layout = rank.layout
        self.kv_cache = rank.kv_cache
        # What the blocks mean (in every block hash; checked on every transfer) and how
        # this replica holds them (compared at start-up with its transfer peers).
        self.content_key = rank.content_key
        self.layout_key = rank.layout_key
        self.compat_key = self.content_key.digest
        num_blocks = rank.num_blocks
        cache = config.cache
        self.blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(
            config.scheduler, self.blocks, self.max_model_len, self.compat_key,
            hold_blocks_on_finish=hold_blocks_on_finish,
        )
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(self.tokenizer)
        self._seqs: dict[str, Seq] = {}
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0}
        log.info(
            "engine ready in %.1fs: %s (%s, %d layers) on %s, %s attention, TP %d, KV cache "
            "%d blocks x %d tokens (%.1f MiB per rank)", time.perf_counter() - t0,
            config.model, mc.architecture, mc.num_layers, self.device,
            self.runner.backend.name, rank.parallel.tp_size, num_blocks, cache.block_size,
            num_blocks * self.layout.block_bytes / 2**20,
        )

    def shutdown(self) -> None:
        """Release the executor's ranks (a no-op for the in-process executor)."""
        self.executor.shutdown()

    # ---- requests ------------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> list[int]:
        """Text, chat messages or token ids -> validated token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(list(prompt)))
        else:
            ids = list(prompt)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError("prompt must be text, chat messages, or a list of token ids")
            bad = [i for i in ids if not 0 <= i < self.model_config.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token id {bad[0]} outside the vocabulary "
                    f"[0, {self.model_config.vocab_size})"
                )
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        return ids

    def add_request(
        self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None
    ) -> Seq:
        """Validate and queue a request; raises ValueError and changes nothing on bad input."""
        params = params or SamplingParams()
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        params.validate_against(self.model_config.vocab_size)
        self.scheduler.check_fits(len(ids), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Seq(request_id, ids, params, seed)
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(request_id)
        self.detokenizer.forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- stepping ------------------------------------------------------------------------

    def step(self, layer_hook: LayerHookFactory | None = None) -> list[RequestOutput]:
        """Schedule and run one batch; returns the new output of every sampled request.

        `layer_hook(batch)` may return a callback run after each layer's K/V is written
        (a prefill worker streams KV to decode workers from it).
        """
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.stats["steps"] += 1
        sampling = [item for item in batch if item.samples]  # before postprocess moves counts
        step = StepInput.from_batch(batch, self.layout.block_size)
        logits = self.executor.execute_model(
            step, layer_hook(batch) if layer_hook else None).logits
        self.stats["prompt_tokens"] += sum(
            max(0, min(i.seq.num_computed_tokens + i.num_new_tokens, i.seq.num_prompt_tokens)
                - i.seq.num_computed_tokens)
            for i in batch
        )
        self.scheduler.postprocess(batch)
        results = self.sampler(logits, [self.sample_request(item.seq) for item in sampling])
        outputs = []
        for item, res in zip(sampling, results):
            outputs.append(self._accept_token(item.seq, res))
        return outputs

    def sample_request(self, seq: Seq) -> SampleRequest:
        return SampleRequest(
            params=seq.params, seed=seq.seed, position=seq.num_tokens,
            num_generated=seq.num_output_tokens, eos_token_ids=self.model_config.eos_token_ids,
        )

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        block_ids: list[int],
        first: SampleResult,
        cached_tokens: int = 0,
    ) -> RequestOutput:
        """Join a request whose prompt KV is already in `block_ids` (written by a prefill
        worker) and whose first token `first` was sampled there; returns that token's output.

        The blocks become the sequence's: they are freed when it finishes or is aborted.
        """
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Seq(request_id, list(prompt_token_ids), params, seed)
        seq.block_ids = list(block_ids)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_cached_tokens = cached_tokens  # reused on the prefill side
        self.scheduler.add_running(seq)
        self.scheduler.commit_full_blocks(seq)
        self._seqs[request_id] = seq
        return self._accept_token(seq, first)

    def _accept_token(self, seq: Seq, res: SampleResult) -> RequestOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        lp = []
        if seq.params.logprobs is not None:
            lp = [TokenLogprob(res.token_id, res.logprob, list(res.top_logprobs))]
            seq.logprobs.extend(lp)
        self.stats["generated_tokens"] += 1
        finished = self.scheduler.append_token(seq, res.token_id,
                                               self.model_config.eos_token_ids)
        # A request ended by a token id (EOS, stop_token_ids) keeps that id in its tokens
        # but not its text: a stop token that is an ordinary word must not leak into it.
        stop_at = self.detokenizer.update(
            seq, skip_last=finished and seq.finish_reason is FinishReason.STOP
        )
        if stop_at is not None:
            seq.output_text = seq.output_text[:stop_at]
            if not finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            finished = True
        out = RequestOutput(
            seq.request_id, [res.token_id], self.detokenizer.emittable_text(seq, finished), lp,
            finished=finished,
        )
        if finished:
            out.finish_reason = seq.finish_reason.value
            out.prompt_tokens = seq.num_prompt_tokens
            out.completion_tokens = seq.num_output_tokens
            out.cached_tokens = seq.num_cached_tokens
            self._seqs.pop(seq.request_id, None)
            self.detokenizer.forget(seq.request_id)
        return out

    def sequence(self, request_id: str) -> Seq | None:
        return self._seqs.get(request_id)
