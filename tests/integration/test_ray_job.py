"""`ray job submit` against a real `ray start --head`: the cluster serves as a Ray job.

The head runs with token auth on (a token of its own, so the test neither reads nor writes
~/.ray/auth_token) and everything on loopback. The job uploads this checkout as its working
dir and runs `python -m pdserve.cluster serve configs/ray-job.yaml --port N`; the test talks gRPC to
the router the job started, checks the answer against HF transformers, checks what was
uploaded and which Python ran the job, then stops the job and the head it started.

Not `ray stop`: it kills every Ray process on the machine, other people's clusters included.
The head runs under `ray start --block` in a process group of its own, and SIGTERM to that
process shuts down exactly the processes it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from testkit import free_ports

pytest.importorskip("ray")
pytest.importorskip("aiohttp", reason="the Ray dashboard (job server) needs ray[default]")
psutil = pytest.importorskip("psutil")

from pdserve.cluster.client import PdserveClient  # noqa: E402
from pdserve.engine.loader.registry import open_model  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/ray-job.yaml"  # relative to the working dir the job runs in
PROMPT = "The capital of France is"
MAX_TOKENS = 12
START_TIMEOUT = 180.0


class Head:
    """A `ray start --head --block` process with token auth, and the CLI calls against it."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.token = secrets.token_hex(32)
        token_path = os.path.join(tmp, "token")
        with open(os.open(token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(self.token)
        bindir = os.path.dirname(sys.executable)
        self.ray = shutil.which("ray", path=bindir) or "ray"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        # The job inherits this environment through the raylet: `python` in its entrypoint
        # is this venv's. RAY_AUTH_MODE=token makes auth explicit (`ray start` turns it on by
        # itself only if a token already exists, and the job CLI sends the token only in
        # token mode); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on 127.0.0.1 instead of
        # the host's routable IP.
        env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=token_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        self.env = env
        gcs, self.dash, agent, client = free_ports(4)
        self.url = f"http://127.0.0.1:{self.dash}"
        self.log = open(os.path.join(tmp, "head.log"), "w")
        self.proc = subprocess.Popen(
            [self.ray, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
             "--node-ip-address=127.0.0.1", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             f"--temp-dir={os.path.join(tmp, 'ray')}", "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def http(self, path: str, token: str | None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers),
                                        timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def wait_dashboard(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.http("/api/version", self.token)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{self.head_log()}")
            time.sleep(0.5)

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        out = subprocess.run([self.ray, *args], env=self.env, cwd=REPO, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout + out.stderr

    def job_status(self, job_id: str) -> str:
        code, body = self.http(f"/api/jobs/{job_id}", self.token)
        return json.loads(body).get("status", "?") if code == 200 else f"HTTP {code}"

    def head_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        """SIGTERM the `ray start --block` process group; SIGKILL what is left after 30 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def _leftovers(tmp: str, router_port: int) -> list[psutil.Process]:
    """Processes of ours still running: Ray's (their command line names our temp dir) and
    the job's driver (`cluster serve ... --port N`)."""
    serve = ["cluster", "serve"]
    port = ["--port", str(router_port)]
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            ours = any(tmp in a for a in cmd) or (
                _contains(cmd, serve) and _contains(cmd, port))
            if ours and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            pass
    return found


def _contains(seq: list[str], sub: list[str]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq)))


def _listener(port: int) -> psutil.Process:
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    raise AssertionError(f"nothing listens on port {port}")


def _wait_router(head: Head, job_id: str, target: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with PdserveClient(target, timeout=10) as client:
        while True:
            try:
                if client.health().serving:
                    return
            except grpc.RpcError:
                pass
            status = head.job_status(job_id)
            if status in ("FAILED", "STOPPED", "SUCCEEDED") or time.monotonic() > deadline:
                logs = head.cli("job", "logs", "--address", head.url, job_id)
                pytest.fail(f"router not serving after {START_TIMEOUT:.0f}s (job {status}):\n"
                            f"{logs[-6000:]}")
            time.sleep(1.0)


def test_ray_job_submit_serves_a_request(hf_model):
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="pdrj", dir="/tmp")  # short: Ray's socket paths live here
    head = Head(tmp)
    (router_port,) = free_ports(1)
    job_id = f"pdserve-test-{secrets.token_hex(4)}"
    submitted = False
    try:
        head.wait_dashboard()
        # Token auth is on: the job API refuses a request without the token.
        assert head.http("/api/jobs/", None)[0] == 401
        head.cli("job", "submit", "--address", head.url, "--submission-id", job_id,
                 "--working-dir", str(REPO), "--no-wait", "--",
                 "python", "-m", "pdserve.cluster", "serve", CONFIG, "--port", str(router_port),
                 "--http-port", "0")
        submitted = True

        ids = open_model("smollm2-135m-instruct").tokenizer.encode(PROMPT)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                    min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=2)
        want = out[0, len(ids):].tolist()

        target = f"127.0.0.1:{router_port}"
        _wait_router(head, job_id, target)
        up = time.monotonic() - t0
        with PdserveClient(target, timeout=60) as client:
            got = client.generate(PROMPT, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS,
                                  temperature=0.0)
        assert got["text"].strip()
        assert got["token_ids"] == want, got["text"]

        # The job's driver (the router's process) runs in the uploaded working dir, which
        # holds the sources but none of .venv, .git, bench/results, and with this venv's
        # packages (it imported torch from it).
        driver = _listener(router_port)
        workdir = Path(driver.cwd())
        assert "working_dir_files" in workdir.parts, workdir
        assert (workdir / "cluster" / "launcher.py").is_file() and (workdir / CONFIG).is_file()
        for excluded in (".venv", ".git", "bench/results"):
            assert not (workdir / excluded).exists(), f"{excluded} was uploaded"
        size = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())
        assert size < 20 << 20, f"working dir upload is {size >> 20} MiB"
        venv = str(Path(sys.prefix)) + os.sep
        assert any(m.path.startswith(venv) for m in driver.memory_maps()), \
            "the job's driver did not load this venv's packages"
        print(f"router serving {up:.1f}s after `ray start`; upload {size >> 10} KiB")
    finally:
        if submitted:
            try:
                head.cli("job", "stop", "--address", head.url, job_id, timeout=60)
            except (AssertionError, subprocess.TimeoutExpired) as e:
                print(f"ray job stop: {e}")
        head.stop()
        for p in _leftovers(tmp, router_port):
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
