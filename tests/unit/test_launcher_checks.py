"""Start-up checks the launcher makes on what its workers report (no Ray started)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from pdserve.cluster.config import parse_config  # noqa: E402
from pdserve.cluster.launcher import Cluster, ClusterStartError  # noqa: E402


def _cluster(ready: list[dict], **config) -> Cluster:
    c = Cluster(parse_config(config))
    c.ready_info = ready
    return c


def _prefill(ip: str) -> dict:
    return {"worker_id": "prefill-0", "role": "prefill", "node_ip": ip, "compat_key": "k"}


def _decode(ip: str, address: str) -> dict:
    return {"worker_id": "decode-0", "role": "decode", "node_ip": ip, "address": address,
            "compat_key": "k"}


def test_loopback_receiver_with_prefill_on_another_host_is_refused():
    c = _cluster([_prefill("10.0.0.1"), _decode("10.0.0.2", "127.0.0.1:4321")])
    with pytest.raises(ClusterStartError, match="decode.transfer_host"):
        c._check_reachable()


@pytest.mark.parametrize("ready", [
    [_prefill("127.0.0.1"), _decode("127.0.0.1", "127.0.0.1:4321")],  # one host
    [_prefill("10.0.0.1"), _decode("10.0.0.2", "10.0.0.2:4321")],     # node-ip
    [_decode("10.0.0.2", "127.0.0.1:4321")],                          # colocated
], ids=["same-host", "node-ip", "no-prefill"])
def test_reachable_receivers_pass(ready):
    _cluster(ready)._check_reachable()


def test_ipv6_loopback_counts_as_loopback():
    c = _cluster([_prefill("10.0.0.1"), _decode("10.0.0.2", "[::1]:4321")])
    with pytest.raises(ClusterStartError):
        c._check_reachable()
