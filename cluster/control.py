"""`pdserve status` and `pdserve stop`: look at, and stop, a running `pdserve serve`.

`pdserve serve` records itself in a run file (`$PDSERVE_RUN_DIR`, default
`/tmp/pdserve-<uid>`, mode 0700): its pid and where it serves. `stop` finds the run file of
the router at `--target` (or the only one there is), sends SIGTERM (the server then stops
its listeners, kills its actors and its private Ray) and waits for the process to exit.
`status` asks the router's gRPC API (Health, ListModels, Admin.Stats). A router started
under `ray job submit` is stopped with `ray job stop` instead: it runs elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def run_dir() -> Path:
    return Path(os.environ.get("PDSERVE_RUN_DIR") or f"/tmp/pdserve-{os.getuid()}")


class RunFile:
    """This process's entry in the run directory, removed when the server stops."""

    def __init__(self, grpc_address: str, http_url: str | None):
        d = run_dir()
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = d / f"router-{grpc_address.rsplit(':', 1)[-1]}-{os.getpid()}.json"
        self.path.write_text(json.dumps({"pid": os.getpid(), "grpc": grpc_address,
                                         "http": http_url, "started": time.time()}))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def running_servers() -> list[dict]:
    """Run files of servers still alive (stale files of dead ones are removed)."""
    found = []
    for path in sorted(run_dir().glob("router-*.json")):
        try:
            entry = json.loads(path.read_text())
            pid = int(entry["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            found.append({**entry, "file": str(path)})
        else:
            path.unlink(missing_ok=True)
    return found


def pick_server(target: str | None) -> dict:
    """The running server at `target` (HOST:PORT of its gRPC API), or the only one."""
    servers = running_servers()
    if target:
        port = target.rsplit(":", 1)[-1]
        servers = [s for s in servers if s["grpc"] == target
                   or s["grpc"].rsplit(":", 1)[-1] == port]
    if not servers:
        where = f" at {target}" if target else ""
        raise LookupError(f"no running pdserve server{where} found in {run_dir()}")
    if len(servers) > 1:
        listed = ", ".join(f"{s['grpc']} (pid {s['pid']})" for s in servers)
        raise LookupError(f"several servers are running ({listed}); pass --target")
    return servers[0]


def stop_server(target: str | None, timeout: float = 60.0) -> dict:
    """SIGTERM the server and wait until it exited; returns its run entry. Raises
    LookupError when there is none, TimeoutError when it does not exit in time."""
    server = pick_server(target)
    pid = server["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pdserve (pid {pid}) did not exit within {timeout:.0f}s")
        time.sleep(0.2)
    Path(server["file"]).unlink(missing_ok=True)
    return server


def format_store_pools(pools) -> list[str]:
    """The global KV store's node pools (`KVStorePool` messages) as table lines; none when
    the store is off."""
    if not pools:
        return []
    lines = [f"{'KV store node':<14}{'tier':<6}{'state':<10}{'used/capacity blocks':>21}"
             f"{'pinned':>8}{'evicted':>9}{'puts':>8}{'hit blocks':>12}{'hit tokens':>12}"
             f"{'hit rate':>10}"]
    for p in pools:
        lines.append(f"{p.node[:12]:<14}{p.tier:<6}{p.state:<10}"
                     f"{p.used_blocks:>12}/{p.capacity_blocks:<8}{p.pinned_blocks:>8}"
                     f"{p.evictions:>9}{p.puts:>8}{p.hit_blocks:>12}{p.hit_tokens:>12}"
                     f"{p.token_hit_rate:>10.1%}")
    return lines


def format_status(target: str, health, model, stats) -> str:
    """The `pdserve status` report from Health, ModelInfo and StatsResponse messages."""
    kinds = f"{health.prefill_workers} prefill x {health.decode_workers} decode" \
        if health.mode == "disaggregated" else f"{health.decode_workers} colocated"
    down = f"; down: {', '.join(health.workers_down)}" if health.workers_down else ""
    lines = [f"router {target}: {'serving' if health.serving else 'NOT serving'}, "
             f"{health.mode} ({kinds} workers up{down})"]
    if model is not None:
        lines.append(f"model {model.name}: max_model_len {model.max_model_len}, "
                     f"block_size {model.block_size}, {model.dtype}")
    if stats is None:
        return "\n".join(lines)
    lines.append(f"{'worker':<14}{'role':<11}{'node':<14}{'KV used':>9}{'free/total':>13}"
                 f"{'running':>9}{'waiting':>9}")
    for w in stats.workers:
        if w.state == "down":
            lines.append(f"{w.worker_id:<14}{w.role:<11}DOWN (dead or hung; being replaced)")
            continue
        used = 1 - w.free_blocks / w.total_blocks if w.total_blocks else 0.0
        lines.append(f"{w.worker_id:<14}{w.role:<11}{w.node[:12]:<14}{used:>8.1%}"
                     f"{w.free_blocks:>7}/{w.total_blocks:<5}{w.running:>9}{w.waiting:>9}")
    lines.append(f"requests: in flight {stats.queued_requests}, finished "
                 f"{stats.requests_finished}, aborted {stats.requests_aborted}, handoff "
                 f"retries {stats.handoff_retries}, migrated {stats.migrations}; workers "
                 f"replaced {stats.workers_replaced}")
    lines += format_store_pools(stats.kv_store)
    return "\n".join(lines)
