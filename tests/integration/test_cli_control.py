"""`pdserve serve` as a user starts it (a subprocess), then `pdserve status` and
`pdserve stop` against it: the HTTP API's address is printed, status lists every worker,
stop (SIGTERM) ends the process cleanly, removes its run file and leaves no process it
started behind."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from process_checks import assert_all_gone, start_serve, started_by

from pdserve.cluster.cli import main as pdserve_main

pytestmark = pytest.mark.slow

CONFIG = """
model: {max_model_len: 256}
kv: {memory_mb: 16}
prefill: {threads: 1}
decode: {threads: 1}
"""


def test_serve_status_stop(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PDSERVE_RUN_DIR", str(tmp_path / "run"))
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    served = start_serve(config)
    proc, grpc_address, http_url = served.proc, served.grpc_address, served.http_url
    try:
        with urllib.request.urlopen(http_url + "/health", timeout=30) as resp:
            assert json.load(resp)["status"] == "ok"

        assert pdserve_main(["status"]) == 0  # the one local server, found by its run file
        out = capsys.readouterr().out
        assert f"router {grpc_address}: serving, disaggregated (1 prefill x 1 decode" in out
        assert re.search(r"prefill-0\s+prefill\s+\S+\s+0\.0%", out), out
        assert re.search(r"decode-0\s+decode\s+\S+\s+0\.0%", out), out
        assert (tmp_path / "run").is_dir() and len(list((tmp_path / "run").iterdir())) == 1

        family = started_by(proc.pid)
        assert pdserve_main(["stop", "--target", grpc_address]) == 0
        assert f"stopped pdserve (pid {proc.pid}" in capsys.readouterr().out
        assert proc.wait(30) == 0
        assert_all_gone(family, within=10.0)
        assert list((tmp_path / "run").iterdir()) == []
        assert pdserve_main(["stop"]) == 1  # nothing left to stop
        assert "no running pdserve server" in capsys.readouterr().err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
