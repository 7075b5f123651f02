"""One rank's share of a model replica: its weight shard, its KV pool, its step runner.

Built the same way on the driver rank and on every follower rank, from the same
`EngineConfig` and that rank's `ParallelContext`; the layers take their own shard of each
weight as they load. The KV pool is allocated separately (`allocate_kv`) because its size
is the driver's decision: followers allocate what the driver tells them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from pdserve.engine.attention.backend import get_backend
from pdserve.engine.config import ContentKey, EngineConfig, torch_dtype
from pdserve.engine.kv_cache.layout import KVLayout, LayoutKey
from pdserve.engine.loader.registry import open_model
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.parallel import ParallelContext, layers_per_stage

log = logging.getLogger("pdserve.engine")


class RankWorker:
    """The model, KV pool and `ModelRunner` of one rank (`runner` exists after
    `allocate_kv`)."""

    def __init__(self, config: EngineConfig, parallel: ParallelContext,
                 device: str | torch.device | None = None):
        self.config = config
        self.parallel = parallel
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(device if device is not None else config.device)
        dtype = torch_dtype(config.dtype)
        source = open_model(config.model, self.device, dtype)
        self.model_config = mc = source.config
        self.tokenizer = source.tokenizer
        limit = config.scheduler.max_model_len or mc.max_position_embeddings
        self.max_model_len = min(limit, mc.max_position_embeddings)
        with torch.device(self.device):
            # The rope table covers the positions this engine serves, not all 128k of 3.1.
            model = LlamaForCausalLM(replace(mc, max_position_embeddings=self.max_model_len),
                                     dtype, parallel)
        model.load_weights(source.weights)
        if config.enable_fused_kernels and _fused_kernels_run(self.device, dtype):
            from pdserve.engine.models.fused_llama import set_fused_kernels

            set_fused_kernels(model, True, "triton" if self.device.type == "cuda" else "cpu")
        if _fused_kernels_run(self.device, dtype) and self.device.type == "cpu":
            _attach_weight_codes(model)
        if self.device.type == "cpu":
            _pack_for_prefill(model)
        self.model = model.eval()
        bs = config.cache.block_size
        # Under tensor parallelism the model holds num_kv_heads / tp_size heads per rank;
        # the KV pool must be laid out the same way or writing K/V fails.
        # A pipeline stage's pool holds only its own layers.
        stage_layers = layers_per_stage(mc.num_layers, parallel.pp_size)[parallel.pp_rank]
        self.layout = KVLayout.for_model(replace(mc, num_layers=stage_layers), bs,
                                         config.dtype, parallel.tp_size)
        self.layout_key = LayoutKey.for_model(mc, bs, config.dtype, parallel.tp_size,
                                              parallel.pp_size)
        self.content_key = ContentKey.for_model(mc, config.dtype,
                                                self.tokenizer.fingerprint)
        self.num_blocks = 0
        self.kv_cache: torch.Tensor | None = None
        self.runner: ModelRunner | None = None

    def default_num_blocks(self) -> int:
        cache = self.config.cache
        return cache.num_blocks or self.layout.num_blocks_for(cache.memory_bytes)

    def allocate_kv(self, num_blocks: int) -> None:
        """Allocate the pool and make the runner (and, on CUDA, capture decode graphs)."""
        config = self.config
        self.num_blocks = num_blocks
        self.kv_cache = self.layout.allocate(num_blocks, self.device)
        backend = get_backend(config.attention_backend, self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, backend, config.cache.block_size,
                                  self.device)
        if self.device.type == "cpu":
            from pdserve.engine.cpu_threads import StepThreads

            self.runner.step_threads = StepThreads.for_rank(config.small_step_tokens)
        # Pure-decode steps replay captured graphs on CUDA (one stage only: a graph cannot
        # hold the point-to-point sends between stages).
        if config.enable_cuda_graphs and self.parallel.pp_size == 1:
            from pdserve.engine.cuda_graph import DecodeGraphRunner

            self.runner.decode_graphs = DecodeGraphRunner.maybe_create(
                self.runner, self.max_model_len, config.scheduler.max_num_seqs
            )


def _projection_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights of every layer's projections (q|k|v, o, gate|up, down); not the LM head."""
    from pdserve.engine.layers import linear

    kinds = (linear.MergedColumnLinear, linear.RowParallelLinear)
    return [m.weight for m in model.modules() if isinstance(m, kinds)]


def _attach_weight_codes(model: torch.nn.Module) -> None:
    """Let CPU products read the weights that are exact 4- or 8-bit block codes (a GGUF's
    Q4_1 / Q8_0 tensors, loaded as float32) as those codes (engine.layers.weight_codes),
    prefill rows included; `PDSERVE_WEIGHT_CODES=0` keeps every product on float32."""
    from pdserve.engine.layers import cpu_kernels, weight_codes

    if not cpu_kernels.codes_enabled():
        return
    weights = _projection_weights(model)
    if getattr(model, "lm_head", None) is not None:
        weights.append(model.lm_head.weight)
    weight_codes.attach(model, weights)
    if cpu_kernels.routing().lanes_rows and cpu_kernels.load() and cpu_kernels.avx512_codes():
        for w in weights:  # packed now, not by the first decode step
            weight_codes.lanes_of(w)


def _pack_for_prefill(model: torch.nn.Module) -> None:
    """oneDNN's packed copies of the projections, made at load rather than by the first
    prompt (`linear.pack_for_prefill`). The LM head is left to be packed on first use: only
    decode batches past our GEMV's rows give it to oneDNN, and its copy is the largest."""
    from pdserve.engine.layers import linear

    start = time.perf_counter()
    n = linear.pack_for_prefill(_projection_weights(model))
    if n:
        log.info("packed %d weights for oneDNN's prompt products in %.1f s", n,
                 time.perf_counter() - start)


def _fused_kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton's on CUDA; ours on CPU for float32 where the host builds them."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or dtype != torch.float32:
        return False
    from pdserve.engine.layers import cpu_kernels

    return cpu_kernels.load()
