"""`pdserve stop`'s run files: a server is found by its gRPC address, stopped with SIGTERM
and waited for; stale files of dead servers are dropped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.cluster.control import RunFile, pick_server, running_servers, stop_server


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def fake_entry(run_dir, pid: int, grpc: str) -> None:
    run_dir.mkdir(mode=0o700, exist_ok=True)
    (run_dir / f"router-{grpc.rsplit(':', 1)[1]}-{pid}.json").write_text(
        json.dumps({"pid": pid, "grpc": grpc, "http": None, "started": 0}))


def test_own_run_file_is_found_and_removed(run_dir):
    f = RunFile("127.0.0.1:50999", "http://127.0.0.1:8999")
    (entry,) = running_servers()
    assert (entry["grpc"], entry["http"]) == ("127.0.0.1:50999", "http://127.0.0.1:8999")
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
    f.remove()
    assert running_servers() == []


def test_stop_sigterms_the_server_and_waits(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_entry(run_dir, proc.pid, "127.0.0.1:51001")
        stopped = stop_server("127.0.0.1:51001", timeout=10)
        assert stopped["pid"] == proc.pid
        assert proc.wait(5) == -15  # SIGTERM
        assert running_servers() == []
    finally:
        proc.kill()


def test_stale_files_are_dropped_and_ambiguity_is_refused(run_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake_entry(run_dir, dead.pid, "127.0.0.1:51002")
    with pytest.raises(LookupError, match="no running pdserve server"):
        pick_server(None)
    assert not list(run_dir.iterdir())
    a = RunFile("127.0.0.1:51003", None)
    b = RunFile("127.0.0.1:51004", None)
    try:
        with pytest.raises(LookupError, match="several servers"):
            pick_server(None)
        assert pick_server("127.0.0.1:51004")["grpc"] == "127.0.0.1:51004"
        with pytest.raises(LookupError, match="at 127.0.0.1:1"):
            pick_server("127.0.0.1:1")
    finally:
        a.remove()
        b.remove()


def test_store_pools_are_a_table_and_nothing_when_the_store_is_off():
    from pdserve.cluster.control import format_store_pools
    from pdserve.proto import pb

    assert format_store_pools([]) == []
    head, row = format_store_pools([pb.KVStorePool(
        node="abcdef0123456789", tier="cpu", state="up", capacity_blocks=512, used_blocks=40,
        pinned_blocks=1, evictions=3, puts=43, hit_blocks=12, hit_tokens=192,
        token_hit_rate=0.25)])
    assert "hit rate" in head
    assert row.split() == ["abcdef012345", "cpu", "up", "40/512", "1", "3", "43", "12", "192",
                           "25.0%"]
