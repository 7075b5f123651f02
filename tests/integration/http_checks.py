"""Helpers the HTTP API tests share: plain HTTP requests with the standard library (so the
checks do not depend on a client library's parsing), SSE reading, metrics scraping, and
the module fixtures over a test module's own `served` fixture (a module imports them)."""

from __future__ import annotations

import http.client as httplib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import openai
import pytest
from cluster_checks import free_blocks
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.background import BackgroundCluster
from pdserve.cluster.client import PdserveClient
from pdserve.cluster.config import parse_config
from pdserve.engine.loader.registry import open_model

MODEL = "smollm2-135m-instruct"
TOKEN = "test-token-7f3a"
TOKEN_ENV = "PDSERVE_HTTP_TEST_TOKEN"
CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the tallest mountain on Earth?"}]
PROMPT = "The capital of France is"


@contextmanager
def http_cluster(router: dict, debug: dict | None = None
                 ) -> Iterator[tuple[BackgroundCluster, PdserveClient, Http]]:
    """A real 1P1D cluster whose gRPC and HTTP APIs need the bearer token TOKEN; a gRPC
    client and an `Http` for it."""
    config = {
        "model": {"name": MODEL, "max_model_len": 512},
        "kv": {"memory_mb": 32},
        "prefill": {"max_num_batched_tokens": 32},
        "router": {"port": 0, "http_port": 0, "auth_token_env": TOKEN_ENV, **router},
        "debug": debug or {},
    }
    os.environ[TOKEN_ENV] = TOKEN
    try:
        with BackgroundCluster(parse_config(config)) as bg, \
                PdserveClient(bg.address, token=TOKEN, timeout=120) as grpc_client:
            yield bg, grpc_client, Http(bg.http_url, TOKEN)
    finally:
        os.environ.pop(TOKEN_ENV, None)


class Http:
    """One server's base URL and bearer token."""

    def __init__(self, base_url: str, token: str | None):
        self.base = base_url
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.token = token

    def connect(self, timeout: float = 120.0) -> httplib.HTTPConnection:
        return httplib.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self, token: str | None = "default") -> dict:
        token = self.token if token == "default" else token
        h = {"Content-Type": "application/json"}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return h

    def request(self, method: str, path: str, body=None, token: str | None = "default",
                raw: bytes | None = None) -> tuple[int, dict | str, dict]:
        """(status, parsed JSON or text, headers) of one request."""
        conn = self.connect()
        try:
            data = raw if raw is not None else (json.dumps(body) if body is not None else None)
            conn.request(method, path, data, self.headers(token))
            resp = conn.getresponse()
            text = resp.read().decode()
            headers = dict(resp.getheaders())
        finally:
            conn.close()
        try:
            return resp.status, json.loads(text), headers
        except ValueError:
            return resp.status, text, headers

    def open_stream(self, path: str, body: dict):
        """Start a streamed POST; returns (connection, response) with the status read."""
        conn = self.connect()
        conn.request("POST", path, json.dumps(body), self.headers())
        return conn, conn.getresponse()

    def metrics(self) -> dict[str, dict]:
        """Every sample of /metrics: {sample name: {frozen labels: value}}."""
        status, text, _ = self.request("GET", "/metrics")
        assert status == 200, text
        out: dict[str, dict] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = frozenset((k, v) for k, v in s.labels.items() if k != "model_name")
                out.setdefault(s.name, {})[labels] = s.value
        return out


def read_event(resp) -> str | None:
    """The next SSE `data:` payload (None at the end of the stream). Asserts the framing:
    every event is exactly one `data: ` line followed by a blank line."""
    line = resp.readline()
    if not line:
        return None
    assert line.startswith(b"data: ") and line.endswith(b"\n"), line
    assert resp.readline() == b"\n"
    return line[len(b"data: "):].decode().rstrip("\n")


def read_all_events(resp) -> list:
    """Every event up to and including `[DONE]`, JSON-decoded (the last is the string)."""
    events = []
    while (data := read_event(resp)) is not None:
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get(name, {}).get(frozenset(labels.items()), 0.0)


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def grpc_client(served) -> PdserveClient:
    return served[1]


@pytest.fixture(scope="module")
def http(served) -> Http:
    return served[2]


@pytest.fixture(scope="module")
def oai(served) -> openai.OpenAI:
    # No retries: a refused request must reach the test, not be sent again.
    return openai.OpenAI(base_url=served[0].http_url + "/v1", api_key=TOKEN, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def start_blocks(grpc_client) -> dict[str, int]:
    blocks = free_blocks(grpc_client)
    assert set(blocks) == {"prefill-0", "decode-0"}
    return blocks


@pytest.fixture(scope="module")
def tokenizer():
    return open_model(MODEL).tokenizer
