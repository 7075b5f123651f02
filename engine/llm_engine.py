"""The engine core: model + KV pool + scheduler + sampler + detokeniser, stepped by callers.

`LLMEngine.step()` runs one scheduled batch and returns what each touched request produced
since the last step. The offline `LLM` drives it in a loop; workers drive it from their own
loops (engine/engine_loop.py) and own its blocks only through its operations: `reserve`
blocks for KV that will come from elsewhere, `adopt` a request whose prompt KV is in them,
`release` them, `abort`, and the read-only `usage()` view. KV moves in and out through a
KV connector (engine/kv_connector.py), never through the engine's parts. The model itself
runs behind an `Executor` (`engine.executor`): in this process by default, or over a
tensor-parallel rank group whose driver this engine is.
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
from pdserve.engine.kv_cache.block_hash import BlockHash
from pdserve.engine.kv_cache.block_manager import BlockManager
from pdserve.engine.kv_cache.prefix_cache import CacheListener
from pdserve.engine.kv_connector import KVConnector, NoKVConnector
from pdserve.engine.sampler import Sampler, SampleRequest, SampleResult
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import FinishReason, Resume, TokenLogprob
from pdserve.engine.sequence import Sequence as Seq

log = logging.getLogger("pdserve.engine")

PromptInput = str | Sequence[int] | Sequence[dict]


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


@dataclass(frozen=True, slots=True)
class Reservation:
    """Blocks an engine set aside for a request whose prompt KV will be written from
    elsewhere. `block_ids` hold tokens `[0, num_tokens)` in order; the first
    `first_new_block` of them are this engine's cached prefix (already written), the rest
    (`new_block_ids`) are fresh and must be written before `adopt`."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    first_new_block: int
    block_size: int

    @property
    def new_block_ids(self) -> tuple[int, ...]:
        return self.block_ids[self.first_new_block:]

    @property
    def num_cached_tokens(self) -> int:
        return self.first_new_block * self.block_size


@dataclass(frozen=True, slots=True)
class EngineUsage:
    """A read-only view of an engine's load: safe to take from any thread (plain counts
    read without the engine thread, so at most one step stale)."""

    free_blocks: int  # free or evictable (cached, unused)
    total_blocks: int
    block_size: int
    running: int
    waiting: int
    reserved: int  # reservations not adopted yet
    held: int  # finished requests whose blocks a transfer still reads
    preemptions: int = 0  # running requests evicted for blocks (since start)
    preempted_tokens: int = 0  # computed tokens those evictions dropped (to recompute)


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
        self.scheduler = Scheduler(
            config.scheduler, self.blocks, self.max_model_len, self.compat_key, self.connector
        )
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(self.tokenizer)
        self._seqs: dict[str, Seq] = {}
        self._reservations: dict[str, tuple[Reservation, list[BlockHash]]] = {}
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
        held = self.scheduler.abort(request_id) is not None
        released = self.release(request_id)
        if seq is not None:
            self.detokenizer.forget(request_id)
        return seq is not None or held or released

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- stepping ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; returns the new output of every sampled request.

        The KV connector's worker half runs with the forward pass: this step's loads and
        saves start before it, each layer waits for its loads and saves itself once
        written (layer l leaves while layer l+1 computes), and the saves are closed after.
        """
        self.release_finished_transfers()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.stats["steps"] += 1
        sampling = [item for item in batch if item.samples]  # before postprocess moves counts
        transfers = self.scheduler.build_step(batch)
        self.connector.start_step(transfers)
        try:
            step = StepInput.from_batch(batch, self.layout.block_size,
                                        self.connector.rank_metadata(transfers))
            logits = self.executor.execute_model(
                step, self.connector if transfers else None).logits
        finally:
            self.connector.end_step()
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
        )

    def subscribe_cache_events(self, listener: CacheListener) -> Callable[[], None]:
        """Call `listener` on the engine thread for every `stored` / `evicted` event of this
        engine's prefix cache (engine/kv_cache/prefix_cache.py); returns the unsubscriber."""
        return self.blocks.prefix_cache.subscribe(listener)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._seqs or request_id in self._reservations \
                or request_id in self.scheduler.held:
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
