"""A real 1P1D cluster with TLS on every port it opens (router gRPC, OpenAI HTTP, the decode
worker's KV receiver, mutual between the workers): clients with the CA stream answers and
plaintext ones are refused; a stranger on the KV port — even one holding a certificate of
the cluster's CA — cannot write into a live request's blocks, and idle streams there do not
delay a normal request. Every test ends with the free blocks back at their start."""

from __future__ import annotations

import http.client as httplib
import json
import ssl
import threading
import time
from collections import Counter

import grpc
import pytest
import torch
from cluster_checks import assert_blocks_back, collect, free_blocks
from http_checks import read_all_events
from tls_certs import make_pki

from pdserve.cluster.background import BackgroundCluster
from pdserve.cluster.client import PdserveClient
from pdserve.cluster.config import parse_config
from pdserve.engine.kv_cache.keys import LayoutKey
from pdserve.kv_transfer.wire import closing_chunk, encode_chunk, pb_grpc
from pdserve.tls import TLSFiles, secure_channel

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

MODEL = "smollm2-135m-instruct"
SHORT = "The capital of France is"
# Long enough that the reservation lives a while (prefill + transfer) for the forger to hit.
LONG = "Tell me about the rivers, mountains and old towns of France. " * 16
N = 8


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def served(pki):
    config = parse_config({
        "model": {"name": MODEL, "max_model_len": 512},
        "kv": {"memory_mb": 32},
        "router": {"port": 0, "http_port": 0},
        "tls": {"cert_file": pki.server_cert, "key_file": pki.server_key, "ca_file": pki.ca,
                "mutual_kv": True},
    })
    with BackgroundCluster(config) as bg, \
            PdserveClient(bg.address, timeout=120, ca_file=pki.ca) as client:
        yield bg, client


@pytest.fixture(scope="module")
def client(served) -> PdserveClient:
    return served[1]


@pytest.fixture(scope="module")
def start_blocks(client) -> dict[str, int]:
    return free_blocks(client)


@pytest.fixture(scope="module")
def kv_port(served, pki):
    """(address, layout) of the decode worker's KV receiver, and a channel to it as a
    stranger that holds a certificate of the cluster's CA but no reservation's sink."""
    info = next(i for i in served[0].cluster.ready_info if i["role"] == "decode")
    tls = TLSFiles(pki.client_cert, pki.client_key, pki.ca)
    with secure_channel(info["address"], tls) as channel:
        yield info["address"], LayoutKey.from_dict(info["layout_key"]), channel


def greedy(client: PdserveClient, prompt: str, **kw) -> dict:
    return collect(client.stream(prompt, max_tokens=N, temperature=0.0, **kw))


def test_tls_clients_stream_and_plaintext_clients_are_refused(served, client, pki,
                                                              start_blocks):
    bg = served[0]
    grpc_answer = greedy(client, SHORT)
    assert grpc_answer["usage"].completion_tokens == N
    with PdserveClient(bg.address, timeout=10) as plain, pytest.raises(grpc.RpcError) as e:
        plain.health()
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE

    assert bg.http_url.startswith("https://")
    host, port = bg.http_url.removeprefix("https://").rsplit(":", 1)
    body = json.dumps({"model": MODEL, "prompt": SHORT, "max_tokens": N, "temperature": 0,
                       "stream": True})
    ctx = ssl.create_default_context(cafile=pki.ca)
    conn = httplib.HTTPSConnection(host, int(port), context=ctx, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        events = read_all_events(resp)
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    assert text == grpc_answer["text"]
    plain = httplib.HTTPConnection(host, int(port), timeout=10)
    with pytest.raises((httplib.HTTPException, OSError)):
        plain.request("GET", "/health")
        plain.getresponse().read()
    plain.close()
    assert_blocks_back(client, start_blocks)


def test_kv_port_refuses_senders_without_a_cluster_certificate(kv_port, client, start_blocks):
    address = kv_port[0]
    for channel in (grpc.insecure_channel(address),
                    secure_channel(address, TLSFiles(ca_file=None))):  # no CA, no cert
        with channel, pytest.raises(grpc.RpcError) as e:
            pb_grpc.KVTransferStub(channel).Push(iter([closing_chunk("x", 1)]), timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert_blocks_back(client, start_blocks)


class Forger(threading.Thread):
    """Pushes whole forged transfers for `request_id` as fast as answers come back, and
    counts the status codes the KV port answered."""

    def __init__(self, channel, layout: LayoutKey, request_id: str) -> None:
        super().__init__(daemon=True)
        self.stub = pb_grpc.KVTransferStub(channel)
        self.rid, self.codes, self.stop = request_id, Counter(), threading.Event()
        shape = (2, 1, layout.block_size, layout.kv_heads_per_rank, layout.head_dim)
        garbage = torch.full(shape, 7.0, dtype=getattr(torch, layout.dtype))
        layers = sum(layout.layers_per_stage)
        self.chunks = [encode_chunk(request_id, layer, 0, garbage, secret="guess")
                       for layer in range(layers)]
        self.chunks.append(closing_chunk(request_id, layers, secret="guess"))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.stub.Push(iter(self.chunks), timeout=5)
                self.codes["OK"] += 1
            except grpc.RpcError as e:
                self.codes[e.code().name] += 1


def test_forged_chunks_for_a_live_request_change_nothing(kv_port, client, start_blocks):
    _, layout, channel = kv_port
    undisturbed = greedy(client, LONG, request_id="calm")
    hits = 0
    for attempt in range(3):  # until the forger hit the reservation while it was live
        rid = f"victim-{attempt}"
        forger = Forger(channel, layout, rid)
        forger.start()
        try:
            time.sleep(0.2)  # forging before the reservation exists: NOT_FOUND
            disturbed = greedy(client, LONG, request_id=rid)
        finally:
            forger.stop.set()
            forger.join(10)
        assert disturbed["token_ids"] == undisturbed["token_ids"]
        assert disturbed["finish_reason"] == undisturbed["finish_reason"]
        assert set(forger.codes) <= {"NOT_FOUND", "PERMISSION_DENIED"}, forger.codes
        hits += forger.codes["PERMISSION_DENIED"]
        if hits:
            break
    assert hits, "the forger never met the live reservation"
    assert client.stats().handoff_retries == 0  # nor did it fail the genuine transfer
    assert_blocks_back(client, start_blocks)


def test_idle_streams_on_the_kv_port_do_not_delay_a_request(kv_port, client, start_blocks):
    _, _, channel = kv_port
    release = threading.Event()

    def nothing():
        release.wait(60)
        return
        yield

    # More than the old thread-per-stream receiver had threads (16).
    idle = [pb_grpc.KVTransferStub(channel).Push.future(nothing(), timeout=60)
            for _ in range(20)]
    try:
        time.sleep(0.5)  # every one open (a stream the receiver cut would be done now)
        assert not any(c.done() for c in idle)
        start = time.monotonic()
        answer = greedy(client, SHORT)
        seconds = time.monotonic() - start
        # The request did not wait for the receiver's idle timeout to cut them (10 s).
        assert not any(c.done() for c in idle), "an idle stream ended first"
    finally:
        release.set()
        for c in idle:
            c.cancel()
    assert answer["usage"].completion_tokens == N and seconds < 8
    assert answer["token_ids"] == greedy(client, SHORT)["token_ids"]
    assert_blocks_back(client, start_blocks)
