"""CUDA-graph replay of pure-decode steps.

A decode step of a Llama-8B-shaped model launches ~400 kernels of a few microseconds of
work each at small batch; launched one by one from Python, the gaps between them cost more
than the work. So the step (embedding -> layers -> final norm -> logits) is captured once
per (batch bucket, context bucket) and replayed:

- batch buckets 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, capped by
  `max_num_seqs`; a batch is padded up to its bucket. Padded rows get slot -1 (write_kv
  skips them) and seq_len 0 (attention does no work for them); their logits are garbage
  and never read;
- context buckets 2k, 8k, 32k, ... up to the model's max length: the Triton decode kernel's
  split plan depends on `max_seq_len` (host side), and a plan made for 128k would leave
  short contexts in one or two splits, i.e. a few programs on an idle GPU. A graph is
  valid for every context up to its bucket.
- the graphs' attention plans splits finer than eager decode does (`GRAPH_DECODE_TILES`):
  a plan made for the bucket's length must still spread a context up to 4x shorter over
  the GPU. At batch 1 on an H100 with 1k contexts, the eager plan (splits of >= 256 keys,
  ~2 programs per SM) left 40 programs busy and cost ~10 us a layer.

Inputs live in one static int32 buffer `[ids | positions | slots | seq_lens | tables]`;
each step fills its pinned host twin and copies the used prefix in one non-blocking H2D
copy, then replays. The graph widens ids/positions/slots to int64 itself. Nothing syncs
with the host except the wait (usually already satisfied) for the previous step's copy
before the pinned buffer is rewritten. Logits land in one static fp32 buffer shared by
all graphs, valid until the next replay.

All graphs share one memory pool and are captured largest first, so the pool is sized by
the largest and the smaller ones reuse it (replays are serial on one stream).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time

import torch

from pdserve.engine import forward_context
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.executor.step import StepInput
from pdserve.messages import blocks_for

log = logging.getLogger("pdserve.engine")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
FIRST_CONTEXT_BUCKET = 2048
# Backends whose launches depend only on host fields fixed at capture (no host sync, no
# host lists of per-sequence lengths).
GRAPH_SAFE_BACKENDS = frozenset({"triton"})
# Split-K plan of the graphs' decode attention: splits down to one 64-key tile, aiming at
# 4 programs per SM (see the module docstring).
GRAPH_DECODE_TILES = {"decode_min_split": 64, "decode_programs_per_sm": 4}


def batch_buckets(max_num_seqs: int) -> list[int]:
    top = min(max_num_seqs, BATCH_BUCKETS[-1])
    return [b for b in BATCH_BUCKETS if b < top] + [top]


def context_buckets(max_model_len: int) -> list[int]:
    out, c = [], FIRST_CONTEXT_BUCKET
    while c < max_model_len:
        out.append(c)
        c *= 4
    return out + [max_model_len]


class DecodeGraphRunner:
    """Captured decode steps of one `ModelRunner`; `run(step)` replays one or declines."""

    def __init__(self, runner, max_model_len: int, max_num_seqs: int, tiles=None):
        self.model = runner.model
        self.kv_cache = runner.kv_cache
        self.backend = _graph_backend(runner.backend, runner.device, tiles)
        self.block_size = bs = runner.block_size
        self.device = runner.device
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.contexts = context_buckets(max_model_len)
        self.n = n = self.batch_sizes[-1]
        max_blocks = blocks_for(self.contexts[-1], bs)
        num_slots = self.kv_cache.shape[2] * bs
        if num_slots >= 2**31:
            raise ValueError(f"{num_slots} KV slots overflow the int32 graph inputs")
        self.host = torch.zeros(4 * n + n * max_blocks, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.host_np[2 * n : 3 * n] = -1  # every row starts as padding
        self.inputs = self.host.to(self.device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=self.device)
        vocab = self.model.config.vocab_size
        self.logits = torch.empty((n, vocab), dtype=torch.float32, device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.replays = 0
        self._copied = torch.cuda.Event()
        self._copied.record()

    @classmethod
    def maybe_create(cls, runner, max_model_len: int, max_num_seqs: int, tiles=None):
        """A captured runner, or None where graphs do not apply (CPU, torch attention, TP).
        `tiles` overrides the graphs' attention tiles (benchmarks compare plans)."""
        if runner.device.type != "cuda":
            return None
        tp = runner.model.parallel.tp_size
        if runner.backend.name not in GRAPH_SAFE_BACKENDS or tp != 1:
            log.info("CUDA graphs off: backend %s, TP size %d", runner.backend.name, tp)
            return None
        graphs = cls(runner, max_model_len, max_num_seqs, tiles)
        graphs.capture()
        return graphs

    # ---- capture ---------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        for ctx in reversed(self.contexts):
            for b in reversed(self.batch_sizes):
                self._forward(b, ctx)  # compiles kernels, sets up cuBLAS outside capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._forward(b, ctx)
                self.graphs[(b, ctx)] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured %d decode graphs (batch <= %d, context <= %d) in %.1fs",
                 len(self.graphs), self.n, self.contexts[-1], time.perf_counter() - t0)

    def _forward(self, b: int, ctx: int) -> None:
        n = self.n
        m = blocks_for(ctx, self.block_size)
        wide = self.inputs[: 3 * n].to(torch.int64)
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.inputs[3 * n : 3 * n + b],
            block_tables=self.inputs[4 * n : 4 * n + b * m].view(b, m),
            slot_mapping=wide[2 * n : 2 * n + b],
            query_lens_host=[1] * b,
            seq_lens_host=[ctx] * b,
            max_query_len=1,
            max_seq_len=ctx,
        )
        step = forward_context.ForwardContext(meta, self.kv_cache, self.backend)
        with forward_context.use(step):
            hidden = self.model(wide[:b], wide[n : n + b])
        self.logits[:b].copy_(self.model.compute_logits(hidden))

    # ---- replay ----------------------------------------------------------------------------

    def run(self, step: StepInput) -> torch.Tensor | None:
        """Logits `[sampling rows, vocab]` of a pure-decode step, or None (run it eagerly).

        The returned tensor is a view of the static output: valid until the next replay.
        """
        real = step.num_seqs
        if real == 0 or real > self.n or len(step.token_ids) != real:
            return None  # a sequence with more than one new token: not a pure decode
        max_len = max(step.context_lens) + 1
        if max_len > self.contexts[-1]:
            return None
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, real)]
        ctx = self.contexts[bisect.bisect_left(self.contexts, max_len)]
        count = self._fill(step, b, ctx)
        self.inputs[:count].copy_(self.host[:count], non_blocking=True)
        self._copied.record()
        self.graphs[(b, ctx)].replay()
        self.replays += 1
        rows = [i for i, samples in enumerate(step.samples) if samples]
        if len(rows) == real:
            return self.logits[:real]
        return self.logits[torch.tensor(rows, dtype=torch.int64).to(self.device)]

    def _fill(self, step: StepInput, b: int, ctx: int) -> int:
        """Write the step into the pinned host buffer; returns how many int32s to copy."""
        self._copied.synchronize()  # the previous step's copy has read the buffer
        h, n, bs = self.host_np, self.n, self.block_size
        m = blocks_for(ctx, bs)
        tables = 4 * n
        for i, (token, pos, blocks) in enumerate(
                zip(step.token_ids, step.context_lens, step.block_tables)):
            used = len(blocks)  # pos // bs + 1: the table covers the new token
            h[i] = token
            h[n + i] = pos
            h[2 * n + i] = blocks[pos // bs] * bs + pos % bs
            h[3 * n + i] = pos + 1
            h[tables + i * m : tables + i * m + used] = blocks
        real = step.num_seqs
        h[real:b] = 0
        h[n + real : n + b] = 0
        h[2 * n + real : 2 * n + b] = -1
        h[3 * n + real : 3 * n + b] = 0
        return tables + b * m


def _graph_backend(backend, device: torch.device, tiles=None):
    """The runner's Triton backend with the graphs' decode split plan (same kernels)."""
    if tiles is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = dataclasses.replace(
            backend.tiles, decode_min_split=GRAPH_DECODE_TILES["decode_min_split"],
            decode_target_programs=GRAPH_DECODE_TILES["decode_programs_per_sm"] * sms,
        )
    return type(backend)(tiles)
