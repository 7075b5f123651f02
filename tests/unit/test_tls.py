"""TLS on the grpc KV transport (mutual TLS between nodes) and the `tls:` config section,
with a throwaway CA and certificates made by `cryptography` (tests/tls_certs.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import torch
from aiohttp import web
from tls_certs import make_pki

from pdserve.bench.client import GenerationClient, ServerUnreachable
from pdserve.bench.fake_server import Pace, start
from pdserve.bench.openai_client import OpenAIClient
from pdserve.bench.workloads import RequestSpec
from pdserve.cluster.config import ConfigError, load_config, parse_config
from pdserve.engine.kv_cache.layout import KVLayout
from pdserve.kv_transfer import KVTransferError, TransferStatus, make_receiver, make_sender
from pdserve.kv_transfer.wire import closing_chunk, pb_grpc
from pdserve.tls import TLSConfigError, TLSFiles

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 2, 8, 16, 2, 8
KEY = "compat-a"
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_receiver(pki):
    dst = KVLayout(LAYERS, HEADS, DIM, BLOCK_SIZE, "float32").allocate(BLOCKS, "cpu")
    rx = make_receiver("grpc", dst, KEY, tls=TLSFiles(pki.server_cert, pki.server_key,
                                                      pki.ca, require_client_cert=True))
    yield dst, rx
    rx.close()


def handoff(rx, tls: TLSFiles | None, rid: str) -> tuple[torch.Tensor, object]:
    """Push every layer of two blocks into a fresh reservation `rid`; (source, handle)."""
    src = torch.randn(LAYERS, 2, BLOCKS, BLOCK_SIZE, HEADS, DIM)
    tx = make_sender("grpc", src, KEY, tls=tls)
    handle = tx.open(rx.expect(rid, [5, 2], 2 * BLOCK_SIZE, time.time() + 30), [1, 3])
    for layer in range(LAYERS):
        handle.send_layer(layer)
    return src, handle, tx


def test_kv_handoff_over_mutual_tls(pki, tls_receiver):
    dst, rx = tls_receiver
    src, handle, tx = handoff(rx, TLSFiles(pki.client_cert, pki.client_key, pki.ca), "ok")
    try:
        handle.finish(timeout=10)
    finally:
        tx.close()
    assert rx.wait("ok", 5) is TransferStatus.COMPLETE
    assert torch.equal(dst[:, :, [5, 2]], src[:, :, [1, 3]])


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "unknown CA"])
def test_kv_port_under_mutual_tls_refuses_other_senders(pki, tls_receiver, tmp_path, who):
    dst, rx = tls_receiver
    tls = {"plaintext": None,
           "no client certificate": TLSFiles(ca_file=pki.ca),
           # a self-made CA the receiver does not know, with a certificate of its own
           "unknown CA": (lambda o: TLSFiles(o.client_cert, o.client_key, pki.ca))(
               make_pki(tmp_path))}[who]
    _, handle, tx = handoff(rx, tls, "r")
    try:
        with pytest.raises(KVTransferError, match="UNAVAILABLE"):
            handle.finish(timeout=10)
    finally:
        tx.close()
    assert rx.status("r") is TransferStatus.PENDING and not dst.any()


def test_sender_refuses_a_receiver_its_ca_did_not_sign(pki, tls_receiver, tmp_path):
    _, rx = tls_receiver
    other = make_pki(tmp_path)  # trusts another CA: the receiver's certificate fails
    _, handle, tx = handoff(rx, TLSFiles(pki.client_cert, pki.client_key, other.ca), "r")
    try:
        with pytest.raises(KVTransferError, match="UNAVAILABLE"):
            handle.finish(timeout=10)
    finally:
        tx.close()
    assert rx.status("r") is TransferStatus.PENDING


def test_raw_plaintext_stream_to_a_tls_kv_port_fails(tls_receiver):
    _, rx = tls_receiver
    rx.expect("r", [0], BLOCK_SIZE, time.time() + 30)
    with grpc.insecure_channel(rx.address) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.KVTransferStub(channel).Push(iter([closing_chunk("r", 0)]), timeout=5)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_files_are_checked_with_clear_errors(pki, tmp_path):
    with pytest.raises(TLSConfigError, match="set both"):
        TLSFiles(cert_file=pki.server_cert)
    with pytest.raises(TLSConfigError, match="CA file"):
        TLSFiles(pki.server_cert, pki.server_key, require_client_cert=True)
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSConfigError, match="nope.pem"):
        TLSFiles(missing, pki.server_key).server_credentials()
    with pytest.raises(TLSConfigError, match="nope.pem"):
        TLSFiles(ca_file=missing).client_ssl_context()
    assert TLSFiles(pki.server_cert, pki.server_key).server_ssl_context() is not None


def test_tls_config_section(pki):
    cfg = parse_config({"tls": {"cert_file": pki.server_cert, "key_file": pki.server_key,
                                "ca_file": pki.ca, "mutual_kv": True,
                                "kv_server_name": "localhost"}})
    assert cfg.tls.receiver_files().require_client_cert
    sender = cfg.tls.sender_files()
    assert (sender.cert_file, sender.ca_file, sender.server_name) == \
        (pki.server_cert, pki.ca, "localhost")
    assert cfg.tls.router_files().ca_file is None  # the router does not ask clients for certs
    assert parse_config({}).tls is None
    bad = [({"cert_file": "a"}, "key_file"),
           ({"cert_file": "a", "key_file": "b", "mutual_kv": True}, "needs tls.ca_file"),
           ({"cert_file": "a", "key_file": "b", "password": "x"}, "tls.password")]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({"tls": section})


def test_shipped_tls_config_names_every_file():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tls.yaml")
    assert cfg.tls.cert_file and cfg.tls.key_file and cfg.tls.ca_file and cfg.tls.mutual_kv
    assert cfg.router.auth_token_env


def test_bench_grpc_client_streams_over_tls_with_the_ca(pki):
    server_tls = TLSFiles(pki.server_cert, pki.server_key)

    async def main():
        server, port = await start(Pace(ttft=0.01, itl=0.01), tls=server_tls)
        target = f"127.0.0.1:{port}"
        try:
            client = GenerationClient(target, ca_file=pki.ca)
            try:
                await client.connect(5.0)
                spec = RequestSpec(3, 2, prompt_token_ids=(1, 2))
                record = await client.generate(spec, "r0")
            finally:
                await client.close()
            plain = GenerationClient(target)
            try:
                with pytest.raises(ServerUnreachable):
                    await plain.connect(2.0)
            finally:
                await plain.close()
        finally:
            await server.stop(None)
        return record

    record = asyncio.run(main())
    assert record.ok and record.streamed_tokens == 3


def test_bench_openai_client_verifies_https_with_the_ca(pki):
    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    async def main():
        app = web.Application()
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        ctx = TLSFiles(pki.server_cert, pki.server_key).server_ssl_context()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        try:
            client = OpenAIClient(url, ca_file=pki.ca)
            try:
                health = await client.connect()
            finally:
                await client.close()
            stranger = OpenAIClient(url)  # the system's roots do not know the test CA
            try:
                with pytest.raises(ServerUnreachable):
                    await stranger.connect()
            finally:
                await stranger.close()
        finally:
            await runner.cleanup()
        return health

    assert asyncio.run(main())["model"] == "m"


def test_launcher_refuses_unreadable_tls_files_before_starting_anything(pki, tmp_path):
    import ray

    from pdserve.cluster.launcher import Cluster, ClusterStartError

    cfg = parse_config({"tls": {"cert_file": pki.server_cert,
                                "key_file": str(tmp_path / "missing.key")}})
    with pytest.raises(ClusterStartError, match="missing.key"):
        Cluster(cfg).start()
    assert not ray.is_initialized()
