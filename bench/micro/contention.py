"""Decode step time alone and beside a competing CPU load: our engine against HF, one run.

Each *side* is a long-lived child process holding one model, started with its own
environment (so OpenMP reads the wait policy and thread count before torch loads it):

- `ours`: our engine with the environment a cluster worker gets
  (`engine.cpu_threads.worker_env`: passive OpenMP waiting);
- `ours-spin`: our engine with the environment a plain process inherits (OpenMP's default
  spin-then-sleep barrier), what workers ran with before;
- `hf`: HF transformers' Llama on the same GGUF, plain environment, a greedy step being one
  `forward` with the KV cache plus an argmax (the loop `generate` runs).

Every side prefills `batch` prompts of `--prompt-len` distinct tokens, then times
`--steps` decode steps one by one (median kept). The parent alternates, round by round,
*alone* and *busy* (a busy-loop process pinned to one core, `--busy-core`), and within each
the sides and batch sizes, so drift from other processes on the machine falls on every cell
alike. Printed: median step time per cell, each side's busy/alone slowdown, and ours/HF
speed in each condition.

Run: `python -m pdserve.bench.micro.contention [--threads 2] [--rounds 3] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
SIDES = ("ours", "ours-spin", "ours-shortspin", "hf", "hf-passive")


# ---- child: one model, answering measurement requests on stdin ----------------------------


def _ours_stepper(threads: int):
    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model=MODEL, num_threads=threads,
        cache=CacheConfig(num_blocks=512, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)))
    counter = iter(range(1 << 30))

    def run(prompts: list[list[int]], steps: int) -> list[float]:
        n = steps + 1
        for p in prompts:
            engine.add_request(f"r{next(counter)}", p, SamplingParams(
                temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True))
        while engine.scheduler.waiting:  # prefill every prompt (first token sampled)
            engine.step()
        times = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        return times[:steps]

    return run


def _hf_stepper(threads: int):
    import torch
    import transformers

    from pdserve.engine.loader.registry import resolve_model_path

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(prompts: list[list[int]], steps: int) -> list[float]:
        ids = torch.tensor(prompts)
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.tolist()  # the host copy a serving loop makes of each step's tokens
            times.append(time.perf_counter() - t0)
        return times

    return run


def child_main(side: str, threads: int) -> int:
    run = _hf_stepper(threads) if side.startswith("hf") else _ours_stepper(threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        times = run(cmd["prompts"], cmd["steps"])
        print(json.dumps({"step_s": times}), flush=True)
    return 0


# ---- parent --------------------------------------------------------------------------------


def side_env(side: str, threads: int, spin_count: int = 20000) -> dict[str, str]:
    """The environment a side's process starts with."""
    from pdserve.engine.cpu_threads import worker_env

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_"))}
    if side in ("ours", "hf-passive"):
        env.update(worker_env(threads))
    else:  # what a plain process inherits: OpenMP defaults, `threads` threads
        env["OMP_NUM_THREADS"] = str(threads)
    if side == "ours-shortspin":
        env["GOMP_SPINCOUNT"] = str(spin_count)
    return env


class Side:
    def __init__(self, name: str, threads: int, spin_count: int):
        self.name = name
        root = Path(__file__).resolve().parents[2]
        env = side_env(name, threads, spin_count)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.bench.micro.contention", "--child", name,
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"side {self.name} exited (code {self.proc.wait()})")
        return json.loads(line)

    def steps(self, prompts: list[list[int]], steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()["step_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _busy_loop(core: int) -> None:
    """Keep `core` busy until stopped, or until the benchmark that started it is gone."""
    os.sched_setaffinity(0, {core})
    parent = os.getppid()
    while os.getppid() == parent:
        for _ in range(1_000_000):
            pass


def prompts_for(batch: int, length: int, salt: int) -> list[list[int]]:
    """`batch` distinct prompts of `length` token ids (no shared prefix, nothing cached)."""
    return [[100 + (salt * 7919 + i * 613 + j * 31) % 40000 for j in range(length)]
            for i in range(batch)]


def run(args: argparse.Namespace) -> dict:
    sides = [Side(name, args.threads, args.spin_count) for name in args.sides]
    cells: dict[str, list[float]] = {}
    try:
        for s in sides:  # warm-up: first-call allocations, oneDNN primitive caches
            for b in args.batches:
                s.steps(prompts_for(b, args.prompt_len, 0), 4)
        salt = 1
        for r in range(args.rounds):
            for load in ("alone", "busy"):
                busy = None
                if load == "busy":
                    busy = mp.Process(target=_busy_loop, args=(args.busy_core,), daemon=True)
                    busy.start()
                    time.sleep(0.5)
                try:
                    for b in args.batches:
                        for s in sides:
                            t = s.steps(prompts_for(b, args.prompt_len, salt), args.steps)
                            salt += 1
                            cells.setdefault(f"{s.name}|{b}|{load}", []).append(
                                statistics.median(t))
                            print(f"round {r + 1} {load:5} batch {b:2} {s.name:9} "
                                  f"{1e3 * statistics.median(t):7.1f} ms/step", file=sys.stderr)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.join()
    finally:
        for s in sides:
            s.close()
    return {k: statistics.median(v) for k, v in cells.items()} | {"rounds": cells}


def render(res: dict, args: argparse.Namespace) -> str:
    rows = ["| side | batch | alone ms/step | busy ms/step | busy/alone |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for b in args.batches:
        for s in args.sides:
            a, c = res[f"{s}|{b}|alone"], res[f"{s}|{b}|busy"]
            rows.append(f"| {s} | {b} | {1e3 * a:.1f} | {1e3 * c:.1f} | {c / a:.2f}x |")
    if "hf" in args.sides:
        rows += ["", "| side / HF speed | batch | alone | busy |",
                 "| --- | ---: | ---: | ---: |"]
        for s in (x for x in args.sides if x != "hf"):
            for b in args.batches:
                rows.append(f"| {s} | {b} | {res[f'hf|{b}|alone'] / res[f'{s}|{b}|alone']:.2f}x"
                            f" | {res[f'hf|{b}|busy'] / res[f'{s}|{b}|busy']:.2f}x |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per cell")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--sides", type=lambda s: s.split(","),
                   default=["ours", "ours-spin", "hf", "hf-passive"])
    p.add_argument("--spin-count", type=int, default=20000,
                   help="GOMP_SPINCOUNT of the ours-shortspin side")
    p.add_argument("--busy-core", type=int, default=(os.cpu_count() or 1) - 1)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if unknown := set(args.sides) - set(SIDES):
        p.error(f"unknown sides {sorted(unknown)}; choose from {SIDES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.threads)
    print(f"uptime: {os.getloadavg()}", file=sys.stderr)
    res = run(args)
    print(render(res, args))
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(res | {"args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
