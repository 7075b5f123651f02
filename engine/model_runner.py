"""Executes one model step for a mixed batch of prefill chunks and decode tokens, on one rank.

The batch is flattened without padding: the tokens of every scheduled sequence are
concatenated, and `AttentionMetadata` says where each sequence starts, how long its context
is and which blocks hold it. Only the last position of a sequence that reaches its end this
step goes through the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch

from pdserve.engine import forward_context
from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.executor.step import StepInput

if TYPE_CHECKING:
    from pdserve.engine.kv_connector import KVConnectorWorker


class ModelRunner:
    """Owns the model, the KV pool tensor and the attention backend of one rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = block_size
        self.device = device
        # Set by the engine on CUDA (engine.cuda_graph.DecodeGraphRunner).
        self.decode_graphs = None
        # Set by the rank on CPU (engine.cpu_threads.StepThreads): threads per step.
        self.step_threads = None

    def prepare(self, step: StepInput) -> tuple[torch.Tensor, ...]:
        """Host-side flattening: (input_ids, positions, metadata, logits row indices)."""
        bs = self.block_size
        qlens, tables = step.query_lens, step.block_tables
        pos: list[int] = []
        slens: list[int] = []
        sample_rows: list[int] = []
        for n, start, samples in zip(qlens, step.context_lens, step.samples):
            pos.extend(range(start, start + n))
            slens.append(start + n)
            if samples:
                sample_rows.append(len(pos) - 1)
        width = max(1, max(len(t) for t in tables))
        block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables],
                                    dtype=torch.int32)
        positions = torch.tensor(pos, dtype=torch.int64)
        # Slot of every new token = its block (from its sequence's table row) * bs + offset,
        # computed with a few tensor ops instead of a Python loop over the tokens.
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(qlens)), torch.tensor(qlens), output_size=len(pos)
        )
        slots = block_tables[seq_of_token, positions // bs].long() * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, *accumulate(qlens)], dtype=torch.int32).to(
                dev, non_blocking=True),
            seq_lens=torch.tensor(slens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            slot_mapping=slots.to(dev, non_blocking=True),
            query_lens_host=qlens,
            seq_lens_host=slens,
            max_query_len=max(qlens),
            max_seq_len=max(slens),
        )
        input_ids = torch.tensor(step.token_ids, dtype=torch.int64).to(dev, non_blocking=True)
        rows = torch.tensor(sample_rows, dtype=torch.int64).to(dev, non_blocking=True)
        return input_ids, positions.to(dev, non_blocking=True), meta, rows

    @torch.inference_mode()
    def execute(
        self,
        step: StepInput,
        kv_connector: KVConnectorWorker | None = None,
    ) -> torch.Tensor:
        """Run the step; returns logits `[num sampling sequences, vocab]` in batch order.

        With `kv_connector` (a step that loads or saves KV), every layer waits for its loads
        before its attention and saves its K/V right after writing them."""
        if self.decode_graphs is not None and kv_connector is None:
            logits = self.decode_graphs.run(step)  # None unless a pure-decode batch fits
            if logits is not None:
                return logits
        if self.model.parallel.pp_size > 1:
            return self._execute_pipelined(step, kv_connector)
        if self.step_threads is not None:
            self.step_threads.before_step(len(step.token_ids))
        input_ids, positions, meta, rows = self.prepare(step)
        ctx = forward_context.ForwardContext(meta, self.kv_cache, self.backend)
        if kv_connector is not None:
            ctx.wait_for_layer = kv_connector.wait_for_layer
            ctx.on_layer_written = kv_connector.save_layer
        with forward_context.use(ctx):
            hidden = self.model(input_ids, positions)
        if rows.numel() != hidden.shape[0]:  # else every row samples (a pure decode step)
            hidden = hidden[rows]
        return self.model.compute_logits(hidden).float()

    def _execute_pipelined(self, step: StepInput,
                           kv_connector: KVConnectorWorker | None = None) -> torch.Tensor | None:
        """This stage's part of the step (`start_pipelined`), waited for (`finish_pipelined`):
        the whole step's logits on the driver, None on every other rank."""
        return self.finish_pipelined(self.start_pipelined(step, kv_connector))

    @torch.inference_mode()
    def start_pipelined(self, step: StepInput,
                        kv_connector: KVConnectorWorker | None = None) -> PipelinedStep:
        """Run this stage's part of the step, as up to `step.micro_batches` (default
        `pp_size`) micro-batches of its sequences, without waiting for the other stages:
        each micro-batch's hidden states come from the previous stage (or the embedding)
        and leave for the next (or the LM head, whose logits go to the driver) without
        waiting, so stage s runs micro-batch i + 1 while stage s + 1 runs micro-batch i.
        On the driver (stage 0) the logits' receives are posted here and waited for in
        `finish_pipelined`, so the driver may start its part of the next step (over other
        sequences) while later stages still run this one: every rank runs the steps in the
        same order, and every pair of ranks sends and receives in that order, so two steps
        in flight cannot cross.

        With `kv_connector`, layers (the stage's pool indices) wait for loads in every
        micro-batch, and are saved during the last one only: a layer is written for every
        sequence of the step only once the last micro-batch wrote it.
        """
        if self.step_threads is not None:
            self.step_threads.before_step(len(step.token_ids))
        pp, model = self.model.parallel, self.model
        dtype = next(model.parameters()).dtype
        parts = step.split(step.micro_batches or pp.pp_size)
        pending = PipelinedStep()
        for i, part in enumerate(parts):
            input_ids, positions, meta, rows = self.prepare(part)
            hidden_in = None
            if not pp.is_first_stage:
                hidden_in = pp.recv_prev((input_ids.shape[0], model.config.hidden_size), dtype,
                                         self.device)
            ctx = forward_context.ForwardContext(meta, self.kv_cache, self.backend)
            if kv_connector is not None:
                ctx.wait_for_layer = kv_connector.wait_for_layer
                if i == len(parts) - 1:
                    ctx.on_layer_written = kv_connector.save_layer
            with forward_context.use(ctx):
                hidden = model(input_ids, positions, hidden_in)
            if not pp.is_last_stage:
                pending.sends.append((pp.isend_next(hidden), hidden))
                continue
            if rows.numel() != hidden.shape[0]:
                hidden = hidden[rows]
            out = model.compute_logits(hidden).float()
            pending.sends.append((pp.isend_logits(out), out))
        if pp.rank == 0:
            pending.logits = [pp.irecv_logits((sum(p.samples), model.config.vocab_size),
                                              self.device) for p in parts]
        return pending

    def finish_pipelined(self, pending: PipelinedStep) -> torch.Tensor | None:
        """Wait for a step `start_pipelined` began: its logits on the driver (in batch
        order), None on every other rank."""
        for work, _ in pending.logits:
            if work is not None:
                work.wait()
        for work, _ in pending.sends:
            if work is not None:
                work.wait()
        if not pending.logits:  # not the driver
            return None
        logits = [t for _, t in pending.logits]
        return torch.cat(logits) if len(logits) > 1 else logits[0]


@dataclass(slots=True)
class PipelinedStep:
    """A pipeline stage's part of a step, started and not yet waited for: the sends still
    in flight (each tensor must live until its work completes) and, on the driver, the
    posted receives of each micro-batch's logits."""

    sends: list[tuple[Any, torch.Tensor]] = field(default_factory=list)
    logits: list[tuple[Any, torch.Tensor]] = field(default_factory=list)
