"""Time TP/PP layouts of SmolLM2-135M on this machine, through the public API only.

    python -m pdserve.bench.layouts --prompt-len 256 --new-tokens 32

For each layout (a prefill/decode split of tensor- and pipeline-parallel ranks) it starts a
real cluster (local Ray, gloo, gRPC), and reports: start-up (launch to serving), TTFT and
TPOT of one greedy request (streamed, first chunk / mean gap after it), and the prompt's KV
bytes each rank sends (prefill ranks) and receives (decode ranks) in a handoff — each rank
moves only its own heads of its own stage's layers (`--concurrency N`: N requests at once,
mean TTFT and TPOT). Prints a markdown table. On a 2-core CPU this shows what the layouts
cost in start-up and communication, not a speed-up: every rank shares the cores.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from pdserve.cluster.background import BackgroundCluster
from pdserve.cluster.client import PdserveClient
from pdserve.cluster.config import parse_config
from pdserve.engine.loader.model_files import read_model_shape

MODEL = "smollm2-135m-instruct"
# name -> (mode, prefill (tp, pp), decode (tp, pp))
LAYOUTS = {
    "P TP1 -> D TP1": ("disaggregated", (1, 1), (1, 1)),
    "P TP1 -> D TP3": ("disaggregated", (1, 1), (3, 1)),
    "P TP3 -> D TP1": ("disaggregated", (3, 1), (1, 1)),
    "P PP2 -> D TP1": ("disaggregated", (1, 2), (1, 1)),
    "P PP2 -> D TP3": ("disaggregated", (1, 2), (3, 1)),
    "colocated TP1": ("colocated", (1, 1), (1, 1)),
    "colocated TP3": ("colocated", (1, 1), (3, 1)),
    "colocated PP2": ("colocated", (1, 1), (1, 2)),
}


def _config(mode: str, p: tuple[int, int], d: tuple[int, int], block_size: int) -> dict:
    def pool(tp_pp: tuple[int, int]) -> dict:
        return {"count": 1, "tp": tp_pp[0], "pp": tp_pp[1], "num_cpus": 0.25, "threads": 1}

    return {"model": {"name": MODEL}, "mode": mode, "transport": "grpc",
            "kv": {"block_size": block_size, "memory_mb": 64},
            "prefill": pool(p), "decode": pool(d),
            "router": {"port": 0, "http_port": None}, "ray": {"num_cpus": 2}}


def _kv_bytes(prompt_len: int, block_size: int) -> int:
    """The prompt's KV (whole blocks, all layers and heads, fp32)."""
    s = read_model_shape(MODEL)
    head_dim = s["hidden_size"] // s["num_heads"]
    blocks = -(-prompt_len // block_size)
    return blocks * block_size * s["num_layers"] * 2 * s["num_kv_heads"] * head_dim * 4


def _timed(client, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) of one streamed greedy request."""
    t = time.perf_counter()
    stamps = []
    for r in client.stream(prompt, max_tokens=new_tokens, min_tokens=new_tokens,
                           temperature=0):
        stamps.extend([time.perf_counter()] * max(1, len(r.token_ids)))
    return stamps[0] - t, (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


def run_layout(name: str, prompt_len: int, new_tokens: int, block_size: int,
               concurrency: int = 1) -> dict:
    mode, p, d = LAYOUTS[name]
    cfg = parse_config(_config(mode, p, d, block_size))
    t0 = time.perf_counter()
    with BackgroundCluster(cfg) as bg, PdserveClient(bg.address, timeout=600) as client:
        startup = time.perf_counter() - t0
        prompts = [[1] + [(7 * i + 13 * c) % 40000 + 100 for i in range(prompt_len - 1)]
                   for c in range(concurrency)]
        client.generate(prompts[0][:16], max_tokens=2)  # warm-up
        with ThreadPoolExecutor(concurrency) as pool:
            timings = list(pool.map(lambda q: _timed(client, q, new_tokens), prompts))
    ttft = sum(t for t, _ in timings) / len(timings)
    tpot = sum(t for _, t in timings) / len(timings)
    kv = _kv_bytes(prompt_len, block_size) if mode == "disaggregated" else 0
    return {"layout": name, "ranks": p[0] * p[1] * (mode == "disaggregated") + d[0] * d[1],
            "startup_s": startup, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
            "kv_per_p_rank": kv // (p[0] * p[1]) if kv else 0,
            "kv_per_d_rank": kv // (d[0] * d[1]) if kv else 0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="requests sent at once (mean TTFT/TPOT over them)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS),
                    help="comma-separated names from: " + "; ".join(LAYOUTS))
    args = ap.parse_args(argv)
    rows = [run_layout(n.strip(), args.prompt_len, args.new_tokens, args.block_size,
                       args.concurrency) for n in args.layouts.split(",")]
    print(f"\nSmolLM2-135M fp32, prompt {args.prompt_len} tokens, {args.new_tokens} new "
          f"tokens, gRPC KV, {args.concurrency} request(s) at once\n")
    print("| layout | ranks | start-up s | TTFT ms | TPOT ms | KV sent / P rank | "
          "KV received / D rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kv_p = f"{r['kv_per_p_rank'] / 2**20:.2f} MiB" if r["kv_per_p_rank"] else "—"
        kv_d = f"{r['kv_per_d_rank'] / 2**20:.2f} MiB" if r["kv_per_d_rank"] else "—"
        print(f"| {r['layout']} | {r['ranks']} | {r['startup_s']:.1f} | {r['ttft_ms']:.0f} | "
              f"{r['tpot_ms']:.1f} | {kv_p} | {kv_d} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
