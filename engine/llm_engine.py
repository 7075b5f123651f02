"""The engine core: model + KV pool + scheduler + sampler + detokeniser, stepped by callers.

`LLMEngine.step()` runs one scheduled batch and returns what each touched request produced
since the last step. The offline `LLM` drives it in a loop; workers drive it from their own
loops (engine/engine_loop.py) and own its blocks only through its operations: `reserve`
blocks for KV that will come from elsewhere, `adopt` a request whose prompt KV is in them,
`release` them, `abort`, and the read-only `usage()` view. KV moves in and out through a
KV connector (engine/kv_connector.py), never through the engine's parts. The model itself
runs behind an `Executor` (`engine.executor`): in this process by default, or over a
tensor-parallel rank group whose driver this engine is. Over pipeline stages the engine
keeps up to one step a stage in flight, each over other sequences (`_step_pipelined`), so
a `step()` may return what a step submitted by an earlier call produced.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pdserve.engine.config import EngineConfig, solo_prefill_default
from pdserve.engine.detokenizer import Detokenizer
from pdserve.engine.engine_types import EngineUsage, RequestOutput, Reservation
from pdserve.engine.executor.base import Executor, StepHandle
from pdserve.engine.executor.step import StepInput
from pdserve.engine.executor.uniproc import UniprocExecutor
from pdserve.engine.kv_cache.block_hash import BlockHash
from pdserve.engine.kv_cache.block_manager import BlockManager
from pdserve.engine.kv_cache.prefix_cache import CacheListener
from pdserve.engine.kv_connector import KVConnector, NoKVConnector
from pdserve.engine.sampler import Sampler, SampleRequest, SampleResult
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq, Scheduler
from pdserve.engine.sequence import FinishReason, Resume, TokenLogprob
from pdserve.engine.sequence import Sequence as Seq

log = logging.getLogger("pdserve.engine")

PromptInput = str | Sequence[int] | Sequence[dict]


@dataclass(slots=True)
class _Flight:
    """A step submitted to the executor and not collected yet."""

    batch: list[ScheduledSeq]
    handle: StepHandle


class LLMEngine:
    """One model replica: the scheduler and sampler here, the model behind `executor`."""

    def __init__(self, config: EngineConfig, kv_connector: KVConnector | None = None,
                 executor: Executor | None = None):
        """`executor` runs the model steps (default: `UniprocExecutor(config)`, the whole
        model in this process); a `MultiprocExecutor` makes this the driver of a rank
        group. `kv_connector` moves KV in and out (default: none)."""
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
        self.connector = kv_connector or NoKVConnector()
        self.connector.register_kv_cache(self.kv_cache, self.compat_key)
        sched = config.scheduler
        if sched.solo_prefill_tokens is None:
            sched = replace(sched, solo_prefill_tokens=solo_prefill_default(self.device.type))
        self.scheduler = Scheduler(
            sched, self.blocks, self.max_model_len, self.compat_key, self.connector
        )
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(self.tokenizer)
        self._seqs: dict[str, Seq] = {}
        self._reservations: dict[str, tuple[Reservation, list[BlockHash]]] = {}
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
                      "overlapped_steps": 0}  # submitted while another was in flight
        # Over pipeline stages up to one step a stage is in flight, each over other
        # sequences (`_step_pipelined`); one process or a TP group runs one at a time.
        self._depth = self.executor.max_in_flight if config.parallel.pipeline_overlap else 1
        self._in_flight: deque[_Flight] = deque()
        # Aborted while a step over them was in flight: finished when it lands, since its
        # ranks may still write their blocks until then.
        self._aborted_in_flight: set[Seq] = set()
        log.info(
            "engine ready in %.1fs: %s (%s, %d layers) on %s, %s attention, TP %d, KV cache "
            "%d blocks x %d tokens (%.1f MiB per rank)", time.perf_counter() - t0,
            config.model, mc.architecture, mc.num_layers, self.device,
            self.runner.backend.name, rank.parallel.tp_size, num_blocks, cache.block_size,
            num_blocks * self.layout.block_bytes / 2**20,
        )

    def shutdown(self) -> None:
        """Release the executor's ranks (a no-op for the in-process executor), after the
        steps still in flight ended (their output is dropped)."""
        self._forget_in_flight()
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
        self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None,
        resume: Resume | None = None,
    ) -> Seq:
        """Validate and queue a request; raises ValueError and changes nothing on bad input.

        `resume` continues a request another engine began (a migration): its output tokens
        are recomputed with the prompt, and sampling goes on from the position after them.
        """
        params = params or SamplingParams()
        self._check_new_id(request_id)
        ids = self.tokenize(prompt)
        params.validate_against(self.model_config.vocab_size)
        self.scheduler.check_fits(len(ids), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Seq(request_id, ids, params, seed)
        if resume is not None:
            self._resume(seq, resume)
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is (waiting, running, reserved, or finished with its
        blocks held for a transfer); its blocks are freed. False if unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None and seq.in_flight:
            # A pipeline stage may still write its blocks: they are freed when it lands.
            self._aborted_in_flight.add(seq)
            self.detokenizer.forget(request_id)
            return True
        held = self.scheduler.abort(request_id) is not None
        released = self.release(request_id)
        if seq is not None:
            self.detokenizer.forget(request_id)
        return seq is not None or held or released

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self._in_flight)

    # ---- stepping ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; returns the new output of every sampled request.

        The KV connector's worker half runs with the forward pass: this step's loads and
        saves start before it, each layer waits for its loads and saves itself once
        written (layer l leaves while layer l+1 computes), and the saves are closed after.
        Over pipeline stages (with `pipeline_overlap`) a step may return the output of a
        step submitted by an earlier call: see `_step_pipelined`.
        """
        self.release_finished_transfers()
        try:
            if self._depth > 1:
                return self._step_pipelined()
            batch = self.scheduler.schedule()
            if not batch:
                return []
            self._launch(batch, self.scheduler.build_step(batch))
            return self._land()
        except BaseException:
            self._forget_in_flight()
            raise

    def _step_pipelined(self) -> list[RequestOutput]:
        """Submit a step over sequences not in flight if fewer than `_depth` steps are in
        flight; collect the oldest once `_depth` are (or nothing new could start), so
        stage 0 runs step t + 1 while the later stages still run step t. A decode batch
        takes at most ceil(running / depth) running sequences, so they split into `depth`
        groups whose steps alternate. A step that moves KV (connector loads or saves) runs
        alone: the steps in flight land first, and it lands before the call returns."""
        outputs: list[RequestOutput] = []
        launched = False
        if len(self._in_flight) < self._depth:
            cap = -(-len(self.scheduler.running) // self._depth)
            batch = self.scheduler.schedule(max_running=cap)
            if batch:
                transfers = self.scheduler.build_step(batch)
                while transfers and self._in_flight:
                    outputs += self._land()
                if self._in_flight:
                    self.stats["overlapped_steps"] += 1
                self._launch(batch, transfers)
                launched = not transfers
        if self._in_flight and (len(self._in_flight) >= self._depth or not launched):
            outputs += self._land()
        return outputs

    def _launch(self, batch: list[ScheduledSeq], transfers) -> None:
        """Submit a scheduled batch; its sequences are in flight until it lands. Behind
        another step in flight the step is one micro-batch (the steps in flight fill the
        stages, and each micro-batch reads the stage's weights again); alone, a pipeline
        splits it into one a stage."""
        self.stats["steps"] += 1
        self.connector.start_step(transfers)
        try:
            step = StepInput.from_batch(batch, self.layout.block_size,
                                        self.connector.rank_metadata(transfers),
                                        micro_batches=1 if self._in_flight else 0)
            # This rank's forward pass is over when `submit` returns (over pipeline stages,
            # the later stages' ranks close their own part of the transfers).
            handle = self.executor.submit(step, self.connector if transfers else None)
        finally:
            self.connector.end_step()
        for item in batch:
            item.seq.in_flight = True
        self._in_flight.append(_Flight(batch, handle))

    def _land(self) -> list[RequestOutput]:
        """Collect the oldest step in flight: advance its sequences, sample their tokens."""
        logits = self.executor.collect(self._in_flight[0].handle).logits
        batch = self._in_flight.popleft().batch
        for item in batch:
            item.seq.in_flight = False
        sampling = [item for item in batch if item.samples]  # before postprocess moves counts
        self.stats["prompt_tokens"] += sum(
            max(0, min(i.seq.num_computed_tokens + i.num_new_tokens, i.seq.num_prompt_tokens)
                - i.seq.num_computed_tokens)
            for i in batch
        )
        self.scheduler.postprocess(batch)
        if self._aborted_in_flight:
            keep = [k for k, item in enumerate(sampling)
                    if item.seq not in self._aborted_in_flight]
            for item in batch:
                if item.seq in self._aborted_in_flight:
                    self._aborted_in_flight.discard(item.seq)
                    self.scheduler.finish(item.seq, FinishReason.ABORT)
            if len(keep) < len(sampling):
                logits, sampling = logits[keep], [sampling[k] for k in keep]
        results = self.sampler(logits, [self.sample_request(item.seq) for item in sampling])
        outputs = []
        for item, res in zip(sampling, results):
            outputs.append(self._accept_token(item.seq, res))
        return outputs

    def _forget_in_flight(self) -> None:
        """Drop the steps in flight (a step failed, or shutdown): wait for each where the
        executor still works (its ranks may write the pool and its buffers until then), end
        their sequences' flight, and do the aborts deferred until they landed, so that
        every block they held comes back."""
        while self._in_flight:
            flight = self._in_flight.popleft()
            try:
                self.executor.collect(flight.handle)
            except Exception as e:  # noqa: BLE001 - the executor reports its own failure
                log.warning("a step in flight did not land: %s", e)
            for item in flight.batch:
                item.seq.in_flight = False
        aborted, self._aborted_in_flight = self._aborted_in_flight, set()
        for seq in aborted:
            self.scheduler.finish(seq, FinishReason.ABORT)

    def sample_request(self, seq: Seq) -> SampleRequest:
        return SampleRequest(
            params=seq.params, seed=seq.seed, position=seq.num_tokens,
            num_generated=seq.num_output_tokens, eos_token_ids=self.model_config.eos_token_ids,
        )

    # ---- blocks owned on behalf of KV that comes from elsewhere -----------------------------

    def reserve(self, request_id: str, num_tokens: int, max_tokens: int,
                prompt_token_ids: Sequence[int] | None = None) -> Reservation:
        """Set blocks aside for the first `num_tokens` tokens of a request whose KV will be
        written from elsewhere (a prefill worker's push). With `prompt_token_ids`, the
        longest prefix of them cached here is reused (never the last token's block), so only
        the blocks after it need writing.

        Raises ValueError if the request can never fit, OutOfBlocksError (taking nothing) if
        it does not fit now. The blocks stay reserved until `adopt` or `release`.
        """
        self._check_new_id(request_id)
        self.scheduler.check_fits(num_tokens, max_tokens)
        ids = None if prompt_token_ids is None else list(prompt_token_ids)[:num_tokens]
        block_ids, cached = self.scheduler.reserve(num_tokens, ids)
        res = Reservation(request_id, tuple(block_ids), num_tokens, len(cached),
                          self.layout.block_size)
        self._reservations[request_id] = (res, cached)
        return res

    def adopt(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        first: SampleResult,
        cached_tokens: int = 0,
        resume: Resume | None = None,
    ) -> RequestOutput:
        """Join a reserved request whose prompt KV is in its reserved blocks and whose first
        token `first` was sampled elsewhere; returns that token's output.

        The KV connector must vouch for every prompt token past the cached prefix (the
        transfer into the reservation completed); otherwise RuntimeError and the
        reservation stays as it was. The blocks become the sequence's: they are freed when
        it finishes or is aborted. `cached_tokens` is what the prefill side reused.
        With `resume` (a migrated request) the pushed KV covers the prompt and the resumed
        output tokens, and `first` is the token after them.
        """
        res, cached = self._reservations.get(request_id, (None, None))
        if res is None:
            raise KeyError(f"request {request_id!r} has no reservation (never made, released, "
                           "or already adopted)")
        n_resumed = len(resume.output_token_ids) if resume is not None else 0
        if len(prompt_token_ids) + n_resumed > res.num_tokens:
            raise ValueError(f"request {request_id}: {len(prompt_token_ids) + n_resumed} "
                             f"tokens to adopt, {res.num_tokens} reserved")
        seq = Seq(request_id, list(prompt_token_ids), params, seed)
        if resume is not None:
            self._resume(seq, resume)
        self.scheduler.adopt(seq, list(res.block_ids), cached)
        del self._reservations[request_id]
        seq.num_cached_tokens = cached_tokens
        self._seqs[request_id] = seq
        return self._accept_token(seq, first)

    def mark_loaded(self, request_id: str, block_hashes: Sequence[BlockHash]) -> Reservation:
        """The first `len(block_hashes)` fresh blocks of a reservation were written here (a
        KV store's connector loaded them) and hold these hashes: they join its prefix (and
        this engine's prefix cache), so the transfer into it starts after them. Returns the
        updated reservation."""
        res, cached = self._reservations[request_id]
        k = len(block_hashes)
        if k >= len(res.new_block_ids):
            raise ValueError(f"request {request_id}: {k} blocks loaded, but the last of its "
                             f"{len(res.new_block_ids)} fresh blocks must come from its push")
        for block, h in zip(res.new_block_ids, block_hashes):
            self.blocks.commit_hash(block, h)
        res = Reservation(request_id, res.block_ids, res.num_tokens, res.first_new_block + k,
                          res.block_size)
        self._reservations[request_id] = (res, cached + list(block_hashes))
        return res

    def release(self, request_id: str) -> bool:
        """Free a reservation that will not be adopted. Its cached prefix blocks go back to
        the prefix cache (evictable, still findable); its fresh blocks, never published,
        to the free list. False if there is none."""
        res, _ = self._reservations.pop(request_id, (None, None))
        if res is None:
            return False
        self.blocks.free(reversed(res.block_ids))
        return True

    def release_finished_transfers(self) -> None:
        """Free the blocks of finished requests whose transfers the connector says ended."""
        self.scheduler.transfers_finished(self.connector.finished_transfers())

    def rank_kv_control(self, op: dict) -> list[dict]:
        """Ask every follower rank's KV connector (`KVConnectorRank.control`); their replies
        in rank order (none with one rank). Engine thread only: it uses the rank group."""
        return self.executor.kv_control(op)

    def usage(self) -> EngineUsage:
        s = self.scheduler
        return EngineUsage(
            free_blocks=self.blocks.num_free_blocks, total_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size, running=len(s.running), waiting=len(s.waiting),
            reserved=len(self._reservations), held=len(s.held),
            preemptions=s.num_preemptions, preempted_tokens=s.num_preempted_tokens,
            solo_steps=s.num_solo_steps,
        )

    def subscribe_cache_events(self, listener: CacheListener) -> Callable[[], None]:
        """Call `listener` on the engine thread for every `stored` / `evicted` event of this
        engine's prefix cache (engine/kv_cache/prefix_cache.py); returns the unsubscriber."""
        return self.blocks.prefix_cache.subscribe(listener)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._seqs or request_id in self._reservations \
                or request_id in self.scheduler.held \
                or any(s.request_id == request_id for s in self._aborted_in_flight):
            raise ValueError(f"request id {request_id!r} is already in use")

    def _resume(self, seq: Seq, resume: Resume) -> None:
        """Give `seq` the output another engine already produced: its tokens, and the
        detokenizer's state after them, rebuilt by feeding them one at a time as the first
        engine did (so the next token's text is decoded with the same left context, and a
        stop string may still span the boundary); `emitted_chars` of that text were
        streamed, so only what follows is emitted."""
        out = list(resume.output_token_ids)
        if len(out) >= seq.params.max_tokens:
            raise ValueError(f"request {seq.request_id}: {len(out)} tokens resumed, "
                             f"max_tokens is {seq.params.max_tokens}")
        for token in out:
            seq.token_ids.append(token)
            self.detokenizer.update(seq)
        if not 0 <= resume.emitted_chars <= len(seq.output_text):
            raise ValueError(f"request {seq.request_id}: {resume.emitted_chars} characters "
                             f"streamed, but its tokens decode to {len(seq.output_text)}")
        seq.num_emitted_chars = resume.emitted_chars

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
