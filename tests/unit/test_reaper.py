"""The reaper (cluster/reaper.py) without Ray: an owner process starts it and some
children, is killed with SIGKILL, and every process it started ends, whether the reaper
finds it by the inherited tag (an orphan that left the tree) or by the recorded tree (a
child whose environment does not show the tag)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from pdserve.cluster.reaper import TAG_ENV, reap

OWNER = textwrap.dedent("""
    import os, subprocess, sys, time
    from pdserve.cluster.reaper import start_reaper

    reaper = start_reaper()
    # An orphan (its shell exits at once): found only by the tag it inherited.
    subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 &"])
    # A child without the tag in its environment: found only by the recorded tree.
    clean = {k: v for k, v in os.environ.items() if k != "PDSERVE_OWNER_TAG"}
    untagged = subprocess.Popen(["sleep", "601"], env=clean)
    print(reaper.pid, untagged.pid, flush=True)
    time.sleep(600)
""")


def _sleepers(arg: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["cmdline"] == ["sleep", arg] and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not procs:
            return []
        time.sleep(0.1)
    return procs


def test_kill_9_of_the_owner_ends_tagged_and_recorded_processes():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        reaper_pid, untagged_pid = map(int, owner.stdout.readline().split())
        reaper = psutil.Process(reaper_pid)
        time.sleep(1.5)  # the reaper records the tree once a second
        orphan = [p for p in _sleepers("600") if p.environ().get(TAG_ENV)]
        assert len(orphan) == 1 and orphan[0].ppid() != owner.pid
        untagged = psutil.Process(untagged_pid)
        assert TAG_ENV not in untagged.environ()
        bystander = subprocess.Popen(["sleep", "602"])  # not the owner's: must survive
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert _wait_gone([*orphan, untagged, reaper], timeout=5.0) == []
        assert bystander.poll() is None
        bystander.kill()
        bystander.wait()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for p in [*_sleepers("600"), *_sleepers("601")]:
            p.kill()


def test_reap_kills_what_ignores_sigterm():
    tag = "t-" + os.urandom(8).hex()
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
        env={**os.environ, TAG_ENV: tag}, stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        start = time.monotonic()
        assert reap(tag, grace=0.5) == [stubborn.pid]
        # Gone soon after the grace period, so by SIGKILL (the reaper also reaped the
        # child's exit status, so Popen cannot report the signal).
        stubborn.wait(5)
        assert not psutil.pid_exists(stubborn.pid)
        assert time.monotonic() - start < 3.0
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
