"""The two keys and the handshake: what a block means (content key, in every block hash)
versus how a side holds it (layout key), and which differences refuse a P/D pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.engine.config import ContentKey, ParallelConfig
from pdserve.engine.executor.base import Executor
from pdserve.engine.executor.rank_worker import RankWorker
from pdserve.engine.kv_cache.block_hash import hash_blocks
from pdserve.engine.kv_cache.layout import (
    HandshakeError,
    LayoutKey,
    check_same_content,
    handshake,
)
from pdserve.engine.llm import engine_config
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import synthetic
from pdserve.engine.parallel import ParallelContext

MODEL = synthetic.synthetic_config("random:tiny", torch.device("cpu"), torch.float32)  # 2 KV heads
CONTENT = ContentKey.for_model(MODEL, "float32", "tok:abc")


def layout(tp: int = 1, pp: int = 1, block_size: int = 16) -> LayoutKey:
    return LayoutKey.for_model(MODEL, block_size, "float32", tp, pp)


def test_prefill_tp2_and_decode_tp1_are_refused_naming_the_fields():
    with pytest.raises(HandshakeError) as e:
        handshake("prefill", CONTENT, layout(tp=2), "decode", CONTENT, layout(tp=1))
    msg = str(e.value)
    assert "prefill tp_size=2, decode tp_size=1" in msg
    assert "prefill kv_heads_per_rank=1, decode kv_heads_per_rank=2" in msg
    assert "content" not in msg and "block_size" not in msg  # only what differs is named


@pytest.mark.parametrize("other, field", [
    (dict(block_size=8), "block_size"),
    (dict(pp=2), "layers_per_stage"),
])
def test_other_layout_differences_are_refused_by_name(other, field):
    with pytest.raises(HandshakeError, match=f"prefill-0 {field}=.*decode-3 {field}="):
        handshake("prefill-0", CONTENT, layout(), "decode-3", CONTENT, layout(**other))


@pytest.mark.parametrize("change", [
    dict(revision="hf:other-weights"), dict(dtype="bfloat16"), dict(tokenizer="tok:other"),
    dict(num_kv_heads=4),
])
def test_content_mismatch_is_refused_even_with_equal_layouts(change):
    other = dataclasses.replace(CONTENT, **change)
    (name,) = change
    with pytest.raises(HandshakeError, match=f"content differs.*prefill {name}="):
        handshake("prefill", CONTENT, layout(), "decode", other, layout())
    with pytest.raises(HandshakeError, match=name):
        check_same_content("decode-0", CONTENT, "decode-1", other)


def test_equal_keys_pass_also_after_crossing_a_process_boundary_as_dicts():
    p = (ContentKey.from_dict(CONTENT.to_dict()), LayoutKey.from_dict(layout(tp=2).to_dict()))
    handshake("prefill", *p, "decode", CONTENT, layout(tp=2))
    check_same_content("a", CONTENT, "b", p[0])
    with pytest.raises(ValueError, match="fields"):
        LayoutKey.from_dict({**layout().to_dict(), "extra": 1})


def test_a_resharding_transport_would_pass_the_split_but_never_the_content():
    split = frozenset({"tp_size", "kv_heads_per_rank"})
    handshake("p", CONTENT, layout(tp=2), "d", CONTENT, layout(tp=1), reshardable=split)
    other = dataclasses.replace(CONTENT, revision="x")
    with pytest.raises(HandshakeError, match="revision"):
        handshake("p", CONTENT, layout(tp=2), "d", other, layout(tp=1), reshardable=split)


def test_grpc_reshards_heads_and_the_sending_pipeline_split_and_refuses_the_rest():
    # random:tiny: 2 layers, 2 KV heads. P PP2 -> D TP1 / TP2, P TP2 -> D TP1: accepted.
    for p, d in ((layout(pp=2), layout()), (layout(pp=2), layout(tp=2)),
                 (layout(tp=2), layout())):
        handshake("prefill-0", CONTENT, p, "decode-0", CONTENT, d, transport="grpc")
    # Receiving pipeline stages: grpc routes layers too; a transport that does not is
    # refused naming the field, even with equal layouts.
    handshake("prefill-0", CONTENT, layout(tp=2), "decode-0", CONTENT, layout(pp=2),
              transport="grpc")
    with pytest.raises(HandshakeError, match="decode-0 pp_size=2: the 'nccl' transport"):
        handshake("prefill-0", CONTENT, layout(pp=2), "decode-0", CONTENT, layout(pp=2),
                  transport="nccl")
    with pytest.raises(HandshakeError, match="prefill-0 block_size=16, decode-0 block_size=8"):
        handshake("prefill-0", CONTENT, layout(pp=2), "decode-0", CONTENT,
                  layout(block_size=8), transport="grpc")
    # A transport that reshards nothing refuses the pipeline split by name.
    with pytest.raises(HandshakeError, match="prefill-0 pp_size=2, decode-0 pp_size=1"):
        handshake("prefill-0", CONTENT, layout(pp=2), "decode-0", CONTENT, layout(),
                  transport="nccl")


class _ShardOnly(Executor):
    """Rank 0 of a TP=2 layout, built without a group: enough to read its keys (a unit test
    runs no step on it)."""

    def __init__(self, config):
        self.worker = RankWorker(config, ParallelContext(tp_rank=0, tp_size=2))
        self.worker.allocate_kv(self.worker.default_num_blocks())

    def execute_model(self, step, on_layer_written=None):
        raise AssertionError("not run in this test")


def test_block_hashes_depend_on_the_content_key_not_on_the_tp_layout():
    tp1 = LLMEngine(engine_config("random:tiny", block_size=8, num_blocks=16))
    config2 = dataclasses.replace(tp1.config, parallel=ParallelConfig(tensor_parallel_size=2))
    tp2 = LLMEngine(config2, executor=_ShardOnly(config2))
    assert tp2.layout_key.tp_size == 2 and tp2.kv_cache.shape[-2] == 1
    assert tp1.layout_key != tp2.layout_key
    assert tp1.compat_key == tp2.compat_key == tp1.content_key.digest
    assert tp1.scheduler.compat_key == tp2.scheduler.compat_key == tp1.compat_key
    tokens = list(range(40))
    assert hash_blocks(tokens, 8, tp1.compat_key) == hash_blocks(tokens, 8, tp2.compat_key)
    other = dataclasses.replace(tp1.content_key, revision="other").digest
    assert hash_blocks(tokens, 8, other) != hash_blocks(tokens, 8, tp1.compat_key)


def test_content_key_names_the_tokenizer_and_weights():
    a = LLMEngine(engine_config("random:tiny", num_blocks=8)).content_key
    b = LLMEngine(engine_config("random:tiny@1", num_blocks=8)).content_key
    assert a.tokenizer == "bytes/512" and a.revision != b.revision and a.digest != b.digest
