"""`pdserve demo "prompt"`: the whole disaggregated path once, start to finish.

Starts a private local cluster from a config (default: configs/local.yaml — local Ray, one
prefill and one decode worker, the bundled SmolLM2 model, KV handed off over gRPC), streams
one chat answer through the router's public gRPC API, says what happened (which workers
served it, the transport, how much KV was handed off and how long that took), and shuts
everything down. It is the README's first command: a newcomer's first answer goes through
a router, a prefill worker, a KV handoff and a decode worker.
"""

from __future__ import annotations

import sys
import time

from pdserve.cluster.background import BackgroundCluster
from pdserve.cluster.client import PdserveClient
from pdserve.cluster.config import ClusterConfig


def run_demo(config: ClusterConfig, prompt: str, max_tokens: int = 64,
             out=sys.stdout) -> int:
    """Serve `prompt` once on a fresh cluster of `config`; returns a process exit code."""
    # A private gRPC port and no HTTP listener: the demo must not collide with a `pdserve
    # serve` already up.
    config = config.model_copy(update={"router": config.router.model_copy(
        update={"port": 0, "http_port": None})})
    pools = (f"{config.prefill.count} prefill + {config.decode.count} decode"
             if config.mode == "disaggregated" else f"{config.decode.count} colocated")
    say = lambda msg: print(f"[pdserve demo] {msg}", file=out, flush=True)  # noqa: E731
    say(f"starting a local cluster: {pools} worker(s), model {config.model.name}, "
        f"KV transport {config.transport} (first start loads the model: ~10-30 s on a CPU)")
    t0 = time.perf_counter()
    tls = config.tls  # a TLS config: the demo's client verifies the router with its CA
    with BackgroundCluster(config) as cluster, PdserveClient(
            cluster.address, ca_file=tls.ca_file if tls else None, tls=tls is not None) as client:
        workers = client.stats().workers
        say(f"ready in {time.perf_counter() - t0:.1f} s; router on {cluster.address}; workers: "
            + ", ".join(f"{w.worker_id} ({w.role})" for w in workers))
        say(f"prompt: {prompt!r}")
        before = {w.worker_id: w for w in workers}
        t1 = time.perf_counter()
        ttft, last, n_tokens = None, None, 0
        for r in client.stream([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                               temperature=0.0):
            if ttft is None and r.token_ids:
                ttft = time.perf_counter() - t1
            n_tokens += len(r.token_ids)
            print(r.text, end="", file=out, flush=True)
            last = r
        print(file=out)
        total = time.perf_counter() - t1
        after = client.stats().workers
        say(f"{n_tokens} tokens, finish reason {last.finish_reason if last else '?'}; first "
            f"token after {1000 * (ttft or total):.0f} ms, whole answer {total:.2f} s")
        for w in after:
            b = before.get(w.worker_id)
            handoffs = w.handoffs - (b.handoffs if b else 0)
            if handoffs:
                nbytes = w.handoff_bytes - (b.handoff_bytes if b else 0)
                secs = w.handoff_seconds - (b.handoff_seconds if b else 0.0)
                say(f"{w.worker_id} prefilled the prompt and handed its KV off over "
                    f"{config.transport}: {handoffs} handoff(s), {nbytes / 1024:.0f} KiB, "
                    f"{1000 * secs:.0f} ms from the transfer's open to its acknowledgement "
                    f"(layer by layer, overlapping the prefill)")
            generated = w.generated_tokens - (b.generated_tokens if b else 0)
            if w.role != "prefill" and generated:
                say(f"{w.worker_id} decoded {generated} token(s); its KV blocks free again: "
                    f"{w.free_blocks}/{w.total_blocks}")
        say("shutting the cluster down")
    return 0 if last is not None else 1
