"""Where a rank group's ranks are placed and where they listen (cluster/rank_groups.py,
engine/executor/group.py): the placement plan of each `pp_placement`, the rendezvous host
it leads to, and a group on loopback that really listens on loopback only."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

from pdserve.cluster.config import ConfigError, parse_config
from pdserve.cluster.rank_groups import RankGroupSpec, placement_plan, rendezvous_host


def _pool(**decode):
    return parse_config({"model": {"name": "random:tiny"}, "mode": "colocated",
                         "decode": decode}).decode


def test_pack_puts_one_bundle_a_rank_on_one_node():
    plan = placement_plan(_pool(tp=2, pp=2, num_cpus=0.25))
    assert plan.strategy == "STRICT_PACK"
    assert plan.bundles == ({"CPU": 0.25},) * 4
    assert plan.bundle_of_rank == (0, 1, 2, 3)


@pytest.mark.parametrize("choice,strategy", [("spread", "SPREAD"),
                                             ("strict_spread", "STRICT_SPREAD")])
def test_spread_gives_each_stage_one_bundle_holding_its_tp_ranks(choice, strategy):
    pool = _pool(tp=2, pp=2, num_cpus=0.25, num_gpus=1, device="cuda",
                 resources={"node_d": 0.5}, pp_placement=choice)
    plan = placement_plan(pool)
    assert plan.strategy == strategy
    # A bundle never spans nodes: a stage's TP ranks share one; the stages may not.
    assert plan.bundles == ({"CPU": 0.5, "GPU": 2, "node_d": 1.0},) * 2
    assert plan.bundle_of_rank == (0, 0, 1, 1)  # stage-major ranks


def test_pp_placement_is_checked_by_the_schema():
    with pytest.raises(ConfigError, match="pp_placement 'spread' places pipeline stages, "
                                          "but pp is 1"):
        _pool(tp=2, pp_placement="spread")
    with pytest.raises(ConfigError, match="decode.pp_placement"):
        _pool(pp=2, pp_placement="scatter")
    assert _pool(pp=2).pp_placement == "pack"  # the default


def test_rendezvous_is_loopback_unless_the_ranks_span_nodes():
    assert rendezvous_host(["n1", "n1", "n1"], "10.0.0.5") == "127.0.0.1"
    assert rendezvous_host(["n1", "n1", "n2", "n2"], "10.0.0.5") == "10.0.0.5"


def test_rank_group_spec_says_where_ranks_bind():
    spec = RankGroupSpec("tcp://10.0.0.5:2345", 4, 20.0, 2, bind_node_ip=True)
    assert RankGroupSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="bind_node_ip"):
        RankGroupSpec.from_dict({k: v for k, v in spec.to_dict().items()
                                 if k != "bind_node_ip"})


def test_a_loopback_group_listens_on_loopback_only(monkeypatch):
    """torch's own rendezvous store listens on every interface; ours on the host named."""
    import socket

    import torch.distributed as dist

    from pdserve.engine.executor.group import init_rank_group, interface_of

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset-by-the-test")  # restored afterwards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = init_rank_group(0, 1, f"tcp://127.0.0.1:{port}", timeout_s=10)
    try:
        me = psutil.Process()
        listening = [c.laddr for c in me.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert any(a.port == port for a in listening), "the rendezvous store is not up"
        wide = [a for a in listening if not ipaddress.ip_address(a.ip).is_loopback]
        assert not wide, f"the rank group listens beyond loopback: {wide}"
    finally:
        group.destroy()
    assert not dist.is_initialized()
    assert interface_of("127.0.0.1") == interface_of("localhost")
    with pytest.raises(ValueError, match="no network interface"):
        interface_of("203.0.113.77")
