"""Time a cluster's start-up and its KV handoffs, through the public API only.

    python -m pdserve.bench.cluster_timings configs/local.yaml --prompt-lens 128,512,1024

Starts `python -m pdserve.cluster serve CONFIG --port 0` as a subprocess, measures the time from
launch to the first streamed answer, then sends sequential greedy requests of each prompt
length and reads `Admin.Stats` before and after each one: the prefill worker's handoff
counters give the handoff time per request (transfer open -> acknowledgement, which
overlaps the last prefill step) and its exposed tail (first token sampled ->
acknowledgement). Prints a markdown table; `--json` writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time

from pdserve.cluster.client import PdserveClient


def _start(config: str, timeout: float) -> tuple[subprocess.Popen, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cluster", "serve", config, "--port", "0",
         "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = t0 + timeout
    for line in proc.stdout:
        m = re.search(r"serving on (\S+:\d+)", line)
        if m:
            return proc, m.group(1), t0
        if time.perf_counter() > deadline:
            break
    proc.kill()
    raise SystemExit(f"error: cluster did not report 'serving on' within {timeout:.0f}s")


def _handoff_totals(client: PdserveClient) -> tuple[int, float, float, int]:
    n = secs = tail = nbytes = 0
    for w in client.stats().workers:
        n += w.handoffs
        secs += w.handoff_seconds
        tail += w.handoff_tail_seconds
        nbytes += w.handoff_bytes
    return n, secs, tail, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.cluster_timings",
                                 description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--prompt-lens", default="128,512,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    proc, address, t0 = _start(args.config, args.startup_timeout)
    # Drain the server's output so it never blocks on a full pipe.
    drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    rng = random.Random(0)
    rows = []
    try:
        with PdserveClient(address) as client:
            first = client.generate("Hello", max_tokens=1, temperature=0.0)
            startup = time.perf_counter() - t0
            assert first["token_ids"], "first answer was empty"
            for n in lens:
                samples = []
                for _ in range(args.repeats):
                    ids = [rng.randrange(100, 30000) for _ in range(n)]
                    before = _handoff_totals(client)
                    t = time.perf_counter()
                    stream = client.stream(ids, max_tokens=2, min_tokens=2, temperature=0.0)
                    next(stream)
                    ttft = time.perf_counter() - t
                    for _ in stream:
                        pass
                    after = _handoff_totals(client)
                    samples.append((ttft, after[1] - before[1], after[2] - before[2],
                                    after[3] - before[3], after[0] - before[0]))
                rows.append({
                    "prompt_tokens": n,
                    "ttft_s": statistics.median(s[0] for s in samples),
                    "handoff_s": statistics.median(s[1] for s in samples),
                    "handoff_tail_s": statistics.median(s[2] for s in samples),
                    "handoff_bytes": samples[-1][3],
                    "handoffs_counted": sum(s[4] for s in samples),
                })
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        drain.kill()
    print(f"time from `pdserve serve` to the first answer: {startup:.1f} s\n")
    print("| prompt tokens | TTFT (s) | handoff open→ack (s) | exposed after 1st token (s) "
          "| KV MiB | MiB/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mib = r["handoff_bytes"] / 2**20
        rate = mib / r["handoff_s"] if r["handoff_s"] else float("nan")
        print(f"| {r['prompt_tokens']} | {r['ttft_s']:.3f} | {r['handoff_s']:.3f} | "
              f"{r['handoff_tail_s']:.3f} | {mib:.1f} | {rate:.0f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"startup_s": startup, "config": args.config, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
