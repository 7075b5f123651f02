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


# ---- the KV handshake at start-up --------------------------------------------------------

def _keyed(worker_id: str, role: str, tp: int = 1, revision: str = "gguf:a",
           block_size: int = 16) -> dict:
    import torch

    from pdserve.engine.config import ContentKey
    from pdserve.engine.kv_cache.layout import LayoutKey
    from pdserve.engine.loader import synthetic

    model = synthetic.synthetic_config("random:tiny", torch.device("cpu"), torch.float32)
    content = ContentKey.for_model(model, "float32", "tok:t")
    return {"worker_id": worker_id, "role": role, "node_ip": "127.0.0.1",
            "content_key": {**content.to_dict(), "revision": revision},
            "layout_key": LayoutKey.for_model(model, block_size, "float32", tp).to_dict()}


def test_tp_differences_are_resharded_by_grpc_and_refused_by_nccl_naming_the_field():
    ready = [_keyed("prefill-0", "prefill", tp=2), _keyed("decode-0", "decode"),
             _keyed("decode-1", "decode", tp=2)]
    _cluster(ready)._check_keys()  # grpc: each P rank sends each D rank the heads both hold
    gpus = {"num_gpus": 1, "device": "cuda"}
    c = _cluster(ready, transport="nccl", prefill=gpus, decode=gpus)
    with pytest.raises(ClusterStartError, match="prefill-0 tp_size=2, decode-0 tp_size=1"):
        c._check_keys()


def test_a_block_size_difference_is_refused_even_by_grpc():
    c = _cluster([_keyed("prefill-0", "prefill", tp=2), _keyed("decode-0", "decode",
                                                                block_size=8)])
    with pytest.raises(ClusterStartError, match="prefill-0 block_size=16, decode-0 block_size=8"):
        c._check_keys()


def test_workers_with_different_weights_fail_start_up_naming_the_field():
    c = _cluster([_keyed("colocated-0", "colocated"),
                  _keyed("colocated-1", "colocated", revision="gguf:b")], mode="colocated")
    with pytest.raises(ClusterStartError, match="colocated-1 revision=gguf:b"):
        c._check_keys()


def test_matching_pairs_pass_and_decode_workers_may_differ_among_themselves():
    _cluster([_keyed("prefill-0", "prefill", tp=2), _keyed("prefill-1", "prefill", tp=2),
              _keyed("decode-0", "decode", tp=2)])._check_keys()
    # Two decode workers never exchange KV: different layouts among them are fine.
    _cluster([_keyed("colocated-0", "colocated"), _keyed("colocated-1", "colocated", tp=2)],
             mode="colocated")._check_keys()


def test_broken_nccl_pairs_are_those_either_side_gave_up_on_among_live_workers():
    from pdserve.cluster.nccl_setup import broken_pairs

    p_ids, d_ids = ["prefill-0", "prefill-1"], ["decode-0", "decode-1"]
    # prefill-0 gave up on decode-1; decode-0 gave up on prefill-1 (and on a worker that is
    # gone); prefill-1 names decode-0 too (the same pair, once).
    pairs = broken_pairs(p_ids, [["decode-1"], ["decode-0"]],
                         d_ids, [["prefill-1", "prefill-9"], []])
    assert pairs == [("prefill-0", "decode-1"), ("prefill-1", "decode-0")]
    assert broken_pairs(p_ids, [[], []], d_ids, [[], []]) == []
