"""The YAML schema refuses tensor/pipeline-parallel sizes a model cannot be split into,
naming the reason, before any worker starts (it reads the model's metadata only)."""

from __future__ import annotations

import pytest

from pdserve.cluster.config import ConfigError, parse_config


def _colocated(model: str, **decode) -> dict:
    return {"model": {"name": model}, "mode": "colocated", "decode": decode}


def test_tp3_of_smollm2_is_accepted_and_reaches_the_engine():
    cfg = parse_config(_colocated("smollm2-135m-instruct", tp=3))
    engine = cfg.engine_config(cfg.decode)
    assert engine.parallel.tensor_parallel_size == 3 and engine.parallel.world_size == 3


def test_tp2_of_smollm2_is_refused_naming_the_heads():
    with pytest.raises(ConfigError) as e:
        parse_config(_colocated("smollm2-135m-instruct", tp=2))
    msg = str(e.value)
    assert "decode.tp=2" in msg and "9 query heads do not split into 2" in msg
    assert "3 KV heads" in msg


def test_tp_beyond_the_kv_heads_replicates_them_when_it_is_a_multiple():
    # random:tiny has 4 query heads and 2 KV heads: at TP 4 each head is on 2 ranks.
    cfg = parse_config(_colocated("random:tiny", tp=4))
    assert cfg.engine_config(cfg.decode).parallel.tensor_parallel_size == 4
    cfg = parse_config({"model": {"name": "random:tiny"}, "prefill": {"tp": 4}})
    assert cfg.engine_config(cfg.prefill).parallel.tensor_parallel_size == 4
    # 3 ranks neither split 2 KV heads nor replicate them evenly.
    with pytest.raises(ConfigError, match="2 KV heads neither split into 3 equal shares "
                                          "nor replicate evenly over 3 ranks"):
        parse_config(_colocated("random:tiny", tp=3))


def test_pipeline_stages_are_checked_against_the_layers():
    cfg = parse_config(_colocated("random:tiny", pp=2, tp=2))  # 2 layers, 2 KV heads
    assert cfg.engine_config(cfg.decode).parallel.world_size == 4
    with pytest.raises(ConfigError, match="its 2 layers cannot fill 3 pipeline stages"):
        parse_config(_colocated("random:tiny", pp=3))
    # Each prefill stage pushes its own layers, each decode stage receives its own (grpc).
    cfg = parse_config({"model": {"name": "random:tiny"}, "prefill": {"pp": 2},
                        "decode": {"tp": 2}})
    assert cfg.engine_config(cfg.prefill).parallel.pipeline_parallel_size == 2
    cfg = parse_config({"model": {"name": "random:tiny"}, "decode": {"pp": 2}})
    assert cfg.engine_config(cfg.decode).parallel.pipeline_parallel_size == 2
    gpus = {"num_gpus": 1, "device": "cuda"}
    with pytest.raises(ConfigError, match="decode.tp=1, decode.pp=2 in mode "
                                          "'disaggregated' needs transport 'grpc'"):
        parse_config({"model": {"name": "random:tiny"}, "transport": "nccl",
                      "prefill": gpus, "decode": {"pp": 2, **gpus}})


def test_parallel_disaggregated_workers_need_a_transport_that_reshards():
    cfg = parse_config({"model": {"name": "random:tiny"}, "prefill": {"tp": 2}})
    assert cfg.engine_config(cfg.prefill).parallel.tensor_parallel_size == 2
    gpus = {"num_gpus": 1, "device": "cuda"}
    with pytest.raises(ConfigError, match="prefill.tp=2, prefill.pp=1 in mode "
                                          "'disaggregated' needs transport 'grpc'"):
        parse_config({"model": {"name": "random:tiny"}, "transport": "nccl",
                      "prefill": {"tp": 2, **gpus}, "decode": gpus})


def test_unsplit_pools_do_not_read_the_model():
    # tp = pp = 1: no metadata read, so an unknown model name is the workers' business.
    parse_config(_colocated("no-such-model"))


def test_bad_sizes_are_refused_by_the_field():
    with pytest.raises(ConfigError, match="decode.tp"):
        parse_config(_colocated("random:tiny", tp=0))
