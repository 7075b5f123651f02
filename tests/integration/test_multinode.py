"""Multi-node placement on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`).

Two raylets on this machine, each with its own custom resource and node label, stand in for
a prefill node and a decode node. The pools are pinned by the YAML (custom resources in one
test, node labels in the other), the KV cache crosses "nodes" over the `grpc` transport to a
receiver bound with `transfer_host: node-ip`, and the output must equal HF transformers'.

A worker's pipeline stages are spread over the two nodes (`pp_placement: spread`) in a
third test: each stage's actor on its own node, and the greedy tokens still HF's.

With the global KV store on, each node runs its own store process and pool: a prefix
prefilled on the head node's worker is pulled over gRPC into the second node's pool by that
node's worker (kv_store/peer_service.py), which then prefills only the new suffix; a read
with a wrong secret is refused.

Everything stays on loopback and private to this test: Ray's temp dir (and with it the
`ray_current_cluster` file that `ray.init(address="auto")` reads) is a fresh directory, the
nodes use 127.0.0.1, and the cluster runs with token auth on, under a token of its own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from testkit import hf_greedy  # noqa: E402

from pdserve.cluster.background import BackgroundCluster  # noqa: E402
from pdserve.cluster.client import PdserveClient  # noqa: E402
from pdserve.cluster.config import parse_config  # noqa: E402
from pdserve.engine.loader.registry import open_model  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.messages import OutputChunk, WorkerRequest  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books "
    "about the stars. Every night the dragon would",
]


@pytest.fixture(scope="module")
def two_nodes():
    """(cluster, {"p": head node id, "d": second node id}) with token auth on, loopback."""
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("Ray is already initialized in this process; the multi-node test must "
                    "connect to its own simulated cluster")
    tmp = tempfile.mkdtemp(prefix="pdmn", dir="/tmp")  # short: Ray's socket paths live here
    token_path = os.path.join(tmp, "token")
    with open(os.open(token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    mp = pytest.MonkeyPatch()
    cluster = None
    try:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN_PATH", token_path)
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        # On Linux Ray swaps 127.0.0.1 for the host's routable IP unless told this is a
        # single-host setup; the variable reaches the nodes, the constant this process.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        reset_auth_token_state()  # this process may have cached another mode or token
        common = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
        # `one_each`: a pool whose workers each need all of it gets one worker a node.
        cluster = Cluster(initialize_head=True, head_node_args={
            **common, "resources": {"node_p": 1, "one_each": 1},
            "labels": {"pdserve/pool": "p"}, "include_dashboard": False})
        second = cluster.add_node(**common, resources={"node_d": 1, "one_each": 1},
                                  labels={"pdserve/pool": "d"})
        yield cluster, {"p": cluster.head_node.node_id, "d": second.node_id}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        mp.undo()
        reset_auth_token_state()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(hf_model):
    """Prompt token ids and HF's greedy continuation of each."""
    tokenizer = open_model("smollm2-135m-instruct").tokenizer
    out = []
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                    min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=2)
        out.append((ids, gen[0, len(ids):].tolist()))
    return out


def _config(address: str, prefill: dict, decode: dict) -> dict:
    return {
        "transport": "grpc",
        "kv": {"block_size": 16, "memory_mb": 24},
        "prefill": {"count": 1, "num_cpus": 0.5, **prefill},
        "decode": {"count": 1, "num_cpus": 0.5, "transfer_host": "node-ip", **decode},
        "router": {"port": 0, "http_port": 0},
        "ray": {"address": address},
    }


def _serve_and_check(config: dict, want_nodes: dict[str, str], reference) -> None:
    t0 = time.monotonic()
    with BackgroundCluster(parse_config(config), ready_timeout=240) as bg, \
            PdserveClient(bg.address, timeout=120) as client:
        started = time.monotonic() - t0
        workers = {w.worker_id: w for w in client.stats().workers}
        assert workers["prefill-0"].node == want_nodes["p"], "prefill is not on its pinned node"
        assert workers["decode-0"].node == want_nodes["d"], "decode is not on its pinned node"
        assert workers["prefill-0"].node != workers["decode-0"].node

        # `node-ip`: the receiver listens on (and advertises) its node's Ray IP.
        decode_info = next(i for i in bg.cluster.ready_info if i["role"] == "decode")
        assert decode_info["address"].rsplit(":", 1)[0] == decode_info["node_ip"] == "127.0.0.1"

        for ids, want in reference:
            got = client.generate(ids, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS,
                                  temperature=0.0)
            assert got["token_ids"] == want, (ids, got["text"])
            assert got["text"] and got["finish_reason"] == "length"

        after = {w.worker_id: w for w in client.stats().workers}
        assert after["prefill-0"].handoffs == len(reference)  # KV really crossed over grpc
        for w in after.values():
            assert w.free_blocks == w.total_blocks, f"{w.worker_id} leaked KV blocks"
    print(f"cluster up in {started:.1f}s, total {time.monotonic() - t0:.1f}s")


def test_pools_pinned_by_custom_resources(two_nodes, reference):
    """prefill needs `node_p` (head only), decode `node_d` (second node only)."""
    cluster, nodes = two_nodes
    config = _config(cluster.address, {"resources": {"node_p": 0.5}},
                     {"resources": {"node_d": 0.5}})
    _serve_and_check(config, nodes, reference)


def test_pools_pinned_by_node_labels(two_nodes, reference):
    """The other way round, by labels: prefill on the node labelled d, decode on p."""
    cluster, nodes = two_nodes
    config = _config(cluster.address, {"node_labels": {"pdserve/pool": "d"}},
                     {"node_labels": {"pdserve/pool": "p"}})
    _serve_and_check(config, {"p": nodes["d"], "d": nodes["p"]}, reference)


def test_pipeline_stages_spread_over_two_nodes_equal_hf(two_nodes, tiny_model_factory):
    """`pp_placement: spread`: one bundle a stage, spread, so stage 0 (the driver) and
    stage 1 (its follower) run on different nodes; the group meets at rank 0's node IP
    (127.0.0.1 here, as every simulated node's) and binds each node's IP; hidden states
    cross between the nodes and the tokens equal HF's."""
    cluster, nodes = two_nodes
    path, hf = tiny_model_factory("llama", seed=61, num_hidden_layers=4)
    config = {
        "model": {"name": path, "max_model_len": 128},
        "mode": "colocated",
        "kv": {"block_size": 8, "memory_mb": 4},
        "decode": {"count": 1, "pp": 2, "pp_placement": "spread", "num_cpus": 0.25,
                   "max_num_batched_tokens": 16, "collective_timeout_s": 20},
        "router": {"port": 0, "http_port": 0},
        "ray": {"address": cluster.address},
    }
    with BackgroundCluster(parse_config(config), ready_timeout=240) as bg, \
            PdserveClient(bg.address, timeout=120) as client:
        group = bg.cluster.worker_groups["colocated-0"]
        (follower,) = group.followers
        stage_nodes = [bg.cluster.ready_info[0]["node"],
                       ray.get(follower.health.remote(), timeout=30)["node"]]
        assert stage_nodes == list(group.rank_nodes)
        assert sorted(stage_nodes) == sorted(nodes.values()), "the stages share a node"
        assert group.rendezvous.startswith("tcp://127.0.0.1:")
        for prompt in ([5, 17, 33], list(range(40, 70))):  # one step; chunked (budget 16)
            out = client.generate(prompt, max_tokens=6, min_tokens=6, temperature=0)
            assert out["token_ids"] == hf_greedy(hf, prompt, 6)
        (w,) = client.stats().workers
        assert w.pp == 2 and w.free_blocks == w.total_blocks and not w.rank_failure


STORY = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman and "
         "his three daughters. Every morning before the sun rose over the hills, the old man "
         "pushed his little blue boat into the water, and every evening")


def _on(handle, ids: list[int], n: int, rid: str) -> list[int]:
    """Greedy tokens of `ids` from one colocated worker actor, called directly: the test
    decides which node's worker serves the request, not the router."""
    params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, seed=1)
    request = WorkerRequest(rid, tuple(ids), params).to_dict()
    refs = handle.generate.options(num_returns="streaming").remote(request)
    return [t for ref in refs for t in OutputChunk.from_dict(ray.get(ref, timeout=120)
                                                             ).token_ids]


def _stats(client) -> dict:
    return {w.worker_id: w for w in client.stats().workers}


def test_a_prefix_in_another_nodes_store_pool_is_pulled_over_grpc(two_nodes, hf_model):
    """colocated-0 and colocated-1, one a node. A prompt prefilled on A leaves its blocks in
    A's node pool; the same prefix on B (called directly) is pulled into B's node pool over
    gRPC and loaded from there: B computes only the new suffix and the tokens are HF's. A
    read of A's pool with a wrong secret is refused and pins or copies nothing."""
    import grpc
    import redis

    from pdserve.kv_store.index import StoreIndex
    from pdserve.proto.stubs.pdserve.v1 import kv_store_pb2 as kpb
    from pdserve.proto.stubs.pdserve.v1 import kv_store_pb2_grpc as kpb_grpc

    cluster, nodes = two_nodes
    n, bs = 4, 16
    config = {
        "mode": "colocated",
        "kv": {"block_size": bs, "memory_mb": 24},
        "decode": {"count": 2, "num_cpus": 0.5, "transfer_host": "node-ip",
                   "resources": {"one_each": 1}},
        "kv_store": {"enabled": True, "pool_mb": 32},
        "router": {"port": 0, "http_port": 0},
        "ray": {"address": cluster.address},
    }
    tokenizer = open_model("smollm2-135m-instruct").tokenizer
    a_ids = tokenizer.encode(STORY + " he sang to the fish.")
    b_ids = tokenizer.encode(STORY + " the daughters cooked supper.")
    shared = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y) // bs * bs
    assert shared >= 2 * bs
    with BackgroundCluster(parse_config(config), ready_timeout=240) as bg, \
            PdserveClient(bg.address, timeout=120) as client:
        # By worker id: ready_info lists the workers in the order they became ready, which
        # under load need not be the order they started in (decode_handles' order).
        handles = {wid: g.driver for wid, g in bg.cluster.worker_groups.items()}
        on = {i["node"]: i["worker_id"] for i in bg.cluster.ready_info}
        assert sorted(on) == sorted(nodes.values()), "the workers share a node"
        a, b = on[nodes["p"]], on[nodes["d"]]
        start = _stats(client)
        assert all(w.free_blocks == w.total_blocks for w in start.values())

        assert _on(handles[a], a_ids, n, "on-a") == hf_greedy(hf_model, a_ids, n)
        url = bg.cluster._worker_cfg.kv_store.redis_url
        key = bg.cluster.compat_key
        a_hashes, b_hashes = (_block_hashes(x, bs, key) for x in (a_ids, b_ids))
        index = StoreIndex(url)
        try:
            deadline = time.monotonic() + 30
            while index.locate(nodes["p"], a_hashes)[0] < shared // bs:
                assert time.monotonic() < deadline, "A's blocks never reached its node's pool"
                time.sleep(0.05)
            assert index.locate(nodes["d"], a_hashes)[0] == 0

            # A stranger without the secret: refused before anything is pinned or read.
            peers = redis.Redis.from_url(url).hgetall(f"{index.namespace}:peers")
            addr_p = peers[nodes["p"].encode()].decode()
            assert addr_p.startswith("127.0.0.1:")  # transfer_host node-ip: the node's IP
            with grpc.insecure_channel(addr_p) as channel:
                with pytest.raises(grpc.RpcError) as e:
                    list(kpb_grpc.KVStorePeerStub(channel).ReadBlocks(kpb.ReadBlocksRequest(
                        secret="guess", hashes=a_hashes), timeout=10))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert index.pool_stats(nodes["p"]).pinned_blocks == 0
            assert index.locate(nodes["d"], a_hashes)[0] == 0

            assert _on(handles[b], b_ids, n, "on-b") == hf_greedy(hf_model, b_ids, n)
            assert index.locate(nodes["d"], b_hashes)[0] >= shared // bs
        finally:
            index.close()
        after = _stats(client)
        wb = after[b]
        assert wb.store_pulled_blocks == shared // bs, "B did not pull the prefix"
        assert wb.store_pulled_bytes > 0 and wb.store_pull_seconds > 0
        assert wb.store_hit_tokens == shared, "B did not load the pulled prefix"
        assert wb.prompt_tokens_processed == len(b_ids) - shared
        assert after[a].store_pulled_blocks == 0
        assert after[a].prompt_tokens_processed == len(a_ids)
        for w in after.values():
            assert w.free_blocks == w.total_blocks, f"{w.worker_id} leaked KV blocks"
        assert all(p.pinned_blocks == 0 for p in client.stats().kv_store)


def _block_hashes(ids: list[int], bs: int, key: str) -> list[bytes]:
    """The block hashes a worker under content key `key` computes for `ids`' loadable
    blocks (never the last token's)."""
    from pdserve.engine.kv_cache.block_hash import hash_blocks

    return hash_blocks(list(ids[:(len(ids) - 1) // bs * bs]), bs, key)
