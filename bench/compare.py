"""``--compare A.yaml B.yaml ...``: the same workload against several cluster configs.

Each config is started in turn as ``python -m pdserve.cluster serve CONFIG`` (the cluster's
contract: it prints a line containing ``serving on HOST:PORT`` when ready and exits cleanly
on SIGINT), benchmarked, and stopped before the next starts, so the configs never share
the machine. The cluster's output goes to a log file beside the report.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pdserve.bench.report import fmt

SERVING_LINE = re.compile(r"serving on (\S+):(\d+)")
_ANY_ADDRESS = {"0.0.0.0", "[::]", "::", ""}


class ClusterError(RuntimeError):
    """A cluster config could not be started or did not report that it is serving."""


def serve_command(config: str) -> list[str]:
    """The command that starts one cluster config."""
    return [sys.executable, "-m", "pdserve.cluster", "serve", config]


class ClusterProcess:
    """A cluster started as a subprocess, usable as a context manager.

    ``__enter__`` returns once the serving line was seen (``target`` is then HOST:PORT) and
    raises ClusterError if the process exits first or ``start_timeout`` passes. ``__exit__``
    stops it: SIGINT, then SIGTERM, then SIGKILL, each after a wait.
    """

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        start_timeout: float = 300.0,
        stop_timeout: float = 60.0,
    ) -> None:
        self.command = list(command)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.target: str | None = None
        self._ready = threading.Event()
        self._tail: deque[str] = deque(maxlen=5)
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def _read(self, stream: Any) -> None:
        # Keep draining after the serving line so the child never blocks on a full pipe.
        with open(self.log_path, "w", encoding="utf-8") as log:
            for line in stream:
                log.write(line)
                log.flush()
                self._tail.append(line.rstrip())
                match = SERVING_LINE.search(line)
                if match and not self._ready.is_set():
                    host = "127.0.0.1" if match.group(1) in _ANY_ADDRESS else match.group(1)
                    self.target = f"{host}:{match.group(2)}"
                    self._ready.set()

    def __enter__(self) -> ClusterProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # a piped child would block-buffer
        # Its own session: a Ctrl-C at our terminal reaches only us, and we stop it in order.
        self._proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.1):
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with code {code}" if code is not None else "timed out"
                last = self._tail[-1] if self._tail else "no output"
                raise ClusterError(
                    f"cluster `{' '.join(self.command)}` {why} before serving "
                    f"(last output: {last}; log: {self.log_path})"
                )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int | None:
        """Stop the process (SIGINT → SIGTERM → SIGKILL); returns its exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            for escalate, wait in ((proc.terminate, self.stop_timeout), (proc.kill, 10.0)):
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    escalate()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return proc.returncode


def config_names(configs: Sequence[str]) -> list[str]:
    """Short column names: file stems, or the paths where stems collide."""
    stems = [Path(c).stem for c in configs]
    return stems if len(set(stems)) == len(stems) else list(configs)


def run_compare(
    configs: Sequence[str],
    run_one: Callable[[str], Any],
    log_dir: Path,
    command: Callable[[str], list[str]] = serve_command,
    start_timeout: float = 300.0,
) -> list[Any]:
    """Start each config, call ``run_one(target)`` against it, stop it; results in order."""
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError(f"cluster config not found: {missing[0]}")
    results = []
    for name, config in zip(config_names(configs), configs, strict=True):
        print(f"starting cluster {config} ...", file=sys.stderr)
        log = log_dir / f"cluster-{name}.log"
        with ClusterProcess(command(config), log, start_timeout=start_timeout) as cluster:
            assert cluster.target is not None
            print(f"cluster {config} serving on {cluster.target}", file=sys.stderr)
            results.append(run_one(cluster.target))
    return results


COMPARED = (
    ("completed", "completed", None),
    ("req/s", "request_throughput", None),
    ("output tok/s", "output_token_throughput", None),
    ("TTFT mean ms", "ttft_ms", "mean"),
    ("TTFT p50 ms", "ttft_ms", "p50"),
    ("TTFT p90 ms", "ttft_ms", "p90"),
    ("TTFT p99 ms", "ttft_ms", "p99"),
    ("TPOT mean ms", "tpot_ms", "mean"),
    ("TPOT p50 ms", "tpot_ms", "p50"),
    ("TPOT p90 ms", "tpot_ms", "p90"),
    ("TPOT p99 ms", "tpot_ms", "p99"),
    ("ITL p50 ms", "itl_ms", "p50"),
    ("ITL p90 ms", "itl_ms", "p90"),
    ("E2E p50 ms", "e2e_ms", "p50"),
    ("E2E p90 ms", "e2e_ms", "p90"),
    ("SLO attainment %", "slo_attainment_pct", None),
    ("goodput req/s", "goodput", None),
)


def _figure(summary: dict[str, Any], key: str, sub: str | None) -> float | None:
    value = summary[key]
    return value[sub] if sub is not None else value


def format_compare(names: Sequence[str], summaries: Sequence[dict[str, Any]], title: str) -> str:
    """Figures side by side; after every config but the first, its ratio to the first."""
    width = max(12, *(len(n) + 4 for n in names))  # room for "x NAME" and a gap
    head = f"{'figure':<18}{names[0]:>{width}}"
    head += "".join(f"{n:>{width}}{'x ' + names[0]:>{width}}" for n in names[1:])
    lines = [f"=== {title} ===", head]
    for label, key, sub in COMPARED:
        base = _figure(summaries[0], key, sub)
        row = f"{label:<18}{fmt(base):>{width}}"
        for summary in summaries[1:]:
            value = _figure(summary, key, sub)
            ratio = value / base if value is not None and base else None
            row += f"{fmt(value):>{width}}{fmt(ratio, 3):>{width}}"
        lines.append(row)
    return "\n".join(lines)
