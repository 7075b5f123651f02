"""Nothing `pdserve serve` started outlives it, however it ends (SIGTERM, Ctrl-C, kill -9).

A clean exit already stops the local Ray (`ray.shutdown`), and Ray makes the processes it
starts directly (GCS, raylet, dashboard head, monitors) die with their parent through
`PR_SET_PDEATHSIG`. That leaves the processes the raylet starts: on `kill -9` of the
driver the dashboard agent and the runtime-env agent notice their raylet is gone, then
hang reporting it to the dead GCS, listening, for good. And a SIGTERM during start-up
ends the process before any cleanup runs.

So `serve` starts a reaper first: a small sidecar process in its own session (Ctrl-C in a
terminal and a kill of the server's process group do not reach it) that polls whether the
server is still its parent. It knows the server's processes two ways, because each misses
some: it records the server's process tree every second (once orphaned, a process leaves
the tree), and everything the server starts inherits an environment variable carrying a
per-server random tag (Ray passes its environment down to GCS, raylet, agents, workers and
actors; a redis-server started with `subprocess` gets it too; but Ray's Python processes
retitle themselves with `setproctitle`, which overwrites the environment block that
/proc/PID/environ shows, so the agents and workers are found only by the tree). When the
server is gone, the reaper SIGTERMs all of them, SIGKILLs whatever is left after a grace
period, and exits.

A process of a *joined* cluster (`ray.address` set) was not started by the server, does not
carry the tag, and is left alone: Ray itself ends the actors the server owned.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import psutil

TAG_ENV = "PDSERVE_OWNER_TAG"
POLL_SECONDS = 0.2
RECORD_SECONDS = 1.0
GRACE_SECONDS = 2.0


def start_reaper() -> subprocess.Popen:
    """Tag this process's environment (inherited by everything it starts from now on) and
    start the reaper that ends those processes once this one is gone. Call it before
    starting Ray or any other helper process."""
    tag = secrets.token_hex(16)
    os.environ[TAG_ENV] = tag
    env = {k: v for k, v in os.environ.items() if k != TAG_ENV}  # never reap itself
    return subprocess.Popen(
        [sys.executable, "-m", "pdserve.cluster.reaper", "--owner", str(os.getpid()),
         "--tag", tag],
        stdin=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True)


def tagged_processes(tag: str) -> list[psutil.Process]:
    """This user's processes whose environment carries `tag` (others' are unreadable)."""
    found = []
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(TAG_ENV) == tag:
                found.append(p)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours
    return found


def reap(tag: str, recorded: Iterable[psutil.Process] = (),
         grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM every process tagged `tag` and every `recorded` one still running (psutil
    refuses to signal a pid reused since it was recorded), SIGKILL what is left after
    `grace` seconds; returns the pids it signalled."""
    procs = {p.pid: p for p in recorded if p.is_running()}
    procs.update((p.pid, p) for p in tagged_processes(tag))
    procs = list(procs.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    late = tagged_processes(tag)  # started while the first ones were dying
    for p in late:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in [*procs, *late]]


def watch(owner: int, tag: str) -> None:
    """Record `owner`'s process tree until `owner` (this process's parent) is gone, then
    reap everything recorded or tagged."""
    recorded: dict[int, psutil.Process] = {}
    me = psutil.Process()
    next_record = 0.0
    while os.getppid() == owner:
        if time.monotonic() >= next_record:
            recorded = _record(owner, me, recorded)
            next_record = time.monotonic() + RECORD_SECONDS
        time.sleep(POLL_SECONDS)
    reap(tag, recorded.values())


def _record(owner: int, me: psutil.Process, recorded: dict[int, psutil.Process]
            ) -> dict[int, psutil.Process]:
    """`owner`'s descendants now, plus those recorded before that still run (a process
    whose parent died has left the tree but is still the owner's)."""
    now = {pid: p for pid, p in recorded.items() if p.is_running()}
    try:
        for p in psutil.Process(owner).children(recursive=True):
            if p.pid != me.pid:
                now.setdefault(p.pid, p)
    except psutil.Error:
        pass  # the owner just ended: reap what was recorded
    return now


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="end a pdserve server's processes after it")
    ap.add_argument("--owner", type=int, required=True)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args(argv)
    # A terminal's Ctrl-C or hang-up is for the server: keep watching until it is gone.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if os.getppid() != args.owner:  # the owner died before we started
        reap(args.tag)
        return 0
    watch(args.owner, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
