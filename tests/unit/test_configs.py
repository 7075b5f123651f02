"""Every shipped config validates; bad configs are refused with a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.cluster.config import ConfigError, load_config, parse_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_the_shipped_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {"local.yaml", "colocated.yaml", "ray-job.yaml", "gpu-1p1d.yaml",
            "multinode.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads(path):
    cfg = load_config(path)
    if cfg.mode == "disaggregated":
        assert cfg.prefill.count >= 1
    for pool in (cfg.prefill, cfg.decode):
        cfg.engine_config(pool)  # the engine side accepts it too


def test_multinode_config_pins_pools_and_opens_the_kv_receiver():
    cfg = load_config(next(p for p in CONFIGS if p.name == "multinode.yaml"))
    assert cfg.prefill.resources == {"prefill_node": 1}
    assert cfg.decode.resources == {"decode_node": 1}
    assert cfg.decode.transfer_host == "node-ip"
    assert cfg.router.host == "0.0.0.0" and cfg.router.auth_token_env  # open => token
    assert cfg.ray.address == "auto"


def test_gpu_config_puts_each_pool_on_its_own_gpu():
    cfg = load_config(next(p for p in CONFIGS if p.name == "gpu-1p1d.yaml"))
    for pool in (cfg.prefill, cfg.decode):
        assert pool.device == "cuda" and pool.num_gpus == 1
    assert cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("colocated, disaggregated", [
    ("gpu-colocated.yaml", "gpu-1p1d.yaml"),
    ("bench/gpu-8b-colocated.yaml", "bench/gpu-8b-1p1d.yaml"),
])
def test_gpu_colocated_baseline_differs_only_in_mode_and_pools(colocated, disaggregated):
    """A fair baseline: the same GPUs (one worker each) and every model, KV, batching and
    router setting of the disaggregated config's decode pool."""
    c, d = load_config(CONFIG_DIR / colocated), load_config(CONFIG_DIR / disaggregated)
    assert (c.mode, d.mode) == ("colocated", "disaggregated")
    assert c.decode.count == d.prefill.count + d.decode.count
    assert c.decode == d.decode.model_copy(update={"count": c.decode.count})
    for section in ("model", "kv", "router", "ray", "debug"):
        assert getattr(c, section) == getattr(d, section), section
    for pool in (c.decode, d.prefill, d.decode):
        assert pool.device == "cuda" and pool.num_gpus == 1


def test_benchmark_configs_use_the_8b_shape_without_prefix_caching():
    for name in ("gpu-8b-colocated.yaml", "gpu-8b-1p1d.yaml"):
        cfg = load_config(CONFIG_DIR / "bench" / name)
        assert cfg.model.name == "random:llama-3.1-8b" and cfg.model.dtype == "bfloat16"
        assert not cfg.kv.enable_prefix_caching


def test_defaults_bind_loopback():
    cfg = parse_config({})
    assert cfg.router.host == "127.0.0.1"
    assert cfg.decode.transfer_host == "127.0.0.1"
    assert cfg.ray.address is None
    assert cfg.ray.node_ip_address == "127.0.0.1"  # every listener of the local Ray


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "test.yaml")
    return str(e.value)


@pytest.mark.parametrize("raw, field", [
    ({"modle": {}}, "modle"),
    ({"prefill": {"countt": 2}}, "prefill.countt"),
    ({"decode": {"resources": {"gpu": 1}, "node_label": {}}}, "decode.node_label"),
    ({"router": {"hostname": "0.0.0.0"}}, "router.hostname"),
    ({"ray": {"adress": "auto"}}, "ray.adress"),
    ({"kv": {"block_size": 16, "memory": 64}}, "kv.memory"),
])
def test_unknown_keys_are_rejected_by_name(raw, field):
    msg = _error(raw)
    assert field in msg and "Extra inputs are not permitted" in msg, msg


@pytest.mark.parametrize("raw, words", [
    ({"decode": {"count": 0}}, ["decode.count"]),
    ({"prefill": {"count": 0}}, ["disaggregated", "prefill.count"]),
    ({"transport": "local"}, ["transport", "local"]),
    ({"transport": "nccl"}, ["nccl", "prefill.num_gpus", "decode.num_gpus"]),
    ({"decode": {"device": "cuda"}}, ["decode.device", "decode.num_gpus"]),
    ({"prefill": {"device": "cuda:0", "num_gpus": 0}}, ["prefill.device", "prefill.num_gpus"]),
    ({"kv": {"block_size": 24}}, ["kv.block_size", "power of two"]),
    ({"mode": "split"}, ["mode"]),
    ({"decode": {"transfer_host": ""}}, ["decode.transfer_host"]),
    ({"router": {"port": 70000}}, ["router.port"]),
    ({"router": {"http_port": 70000}}, ["router.http_port"]),
    ({"router": {"http_hots": "0.0.0.0"}}, ["router.http_hots"]),
    ({"prefill": {"num_cpus": 0}}, ["prefill.num_cpus"]),
    ({"prefill": {"resources": {"prefill_node": "many"}}}, ["prefill.resources.prefill_node"]),
    ({"ray": {"address": "auto", "node_ip_address": "10.0.0.5"}},
     ["ray.node_ip_address", "ray.address unset", "ray start --node-ip-address"]),
    ({"ray": {"node_ip_address": "0.0.0.0"}}, ["ray.node_ip_address", "wildcard"]),
    ({"ray": {"node_ip_address": "my-host"}}, ["ray.node_ip_address", "IP address"]),
    ({"router": {"policy": "kv_aware"}}, ["router.policy", "kv_store.enabled"]),
    ({"router": {"policy": "random"}}, ["router.policy"]),
    ({"kv_store": {"verify": "md5"}}, ["kv_store.verify", "header", "crc"]),
    ({"decode": {"solo_prefill_tokens": -1}}, ["solo_prefill_tokens", ">= 0"]),
])
def test_bad_values_and_combinations_name_the_field(raw, words):
    msg = _error(raw)
    assert msg.startswith("test.yaml is invalid")
    for w in words:
        assert w in msg, msg


def test_solo_prefills_are_left_to_the_engine_unless_set():
    cfg = parse_config({"mode": "colocated", "decode": {"solo_prefill_tokens": 0}})
    assert cfg.engine_config(cfg.decode).scheduler.solo_prefill_tokens == 0
    auto = parse_config({"mode": "colocated"})
    assert auto.engine_config(auto.decode).scheduler.solo_prefill_tokens is None


def test_colocated_needs_no_prefill_pool():
    cfg = parse_config({"mode": "colocated", "prefill": {"count": 0}})
    assert cfg.mode == "colocated"


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: [count: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_http_api_defaults_to_loopback_and_can_be_turned_off():
    router = parse_config({}).router
    assert (router.http_host, router.http_port) == ("127.0.0.1", 8000)
    assert parse_config({"router": {"http_port": None}}).router.http_port is None


def test_a_local_ray_may_name_its_node_address():
    assert parse_config({"ray": {"node_ip_address": "10.0.0.5"}}).ray.node_ip_address == \
        "10.0.0.5"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_a_config_dumped_and_parsed_again_is_the_same(path):
    """What the CLI does to apply --port and friends."""
    cfg = load_config(path)
    assert parse_config(cfg.model_dump(mode="json")) == cfg


def test_parallel_configs_give_each_pool_its_tensor_parallelism():
    cpu = load_config(CONFIG_DIR / "cpu-tp.yaml")
    assert (cpu.prefill.tp, cpu.decode.tp, cpu.transport) == (1, 3, "grpc")
    assert cpu.engine_config(cpu.decode).parallel.tensor_parallel_size == 3
    gpu = load_config(CONFIG_DIR / "gpu-tp.yaml")
    assert (gpu.prefill.tp, gpu.decode.tp) == (3, 1) and gpu.prefill.num_gpus == 1


def test_the_routing_policy_is_kv_aware_exactly_when_the_store_runs_unless_named():
    assert parse_config({}).routing_policy == "least_loaded"
    assert parse_config({"kv_store": {"enabled": True}}).routing_policy == "kv_aware"
    assert parse_config({"kv_store": {"enabled": True}, "router": {
        "policy": "least_loaded"}}).routing_policy == "least_loaded"
