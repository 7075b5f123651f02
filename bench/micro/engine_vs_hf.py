"""Our engine against HF transformers `generate`, same model, same machine, one run.

Two workloads, both greedy, fp32, on the CPU, with the same number of torch threads:

- **batch 1**: one ~32-token prompt, 128 forced new tokens (`min_tokens == max_tokens`;
  HF `min_new_tokens == max_new_tokens`), tokens/s, median of the repeats;
- **mixed 16**: 16 prompts of mixed input and output lengths drawn from a seed. Ours gets
  them in one `LLM.generate` call (continuous batching, chunked prefill); HF gets them the
  way a user would send them: one left-padded batch with an attention mask and
  `max_new_tokens` = the longest requested output. HF cannot stop a row at its own length,
  so it generates `16 x max` tokens of which only `sum(requested)` are useful; both sides
  are credited with the useful tokens only.

Ours and HF runs alternate, so that noise from other processes on the machine falls on both
sides alike; the ratio is taken between medians measured in the same run. Prefix caching is
off in our engine, since repeating identical prompts would otherwise let it skip prefill.
Busy co-tenants still hurt multi-threaded runs unevenly (OpenMP threads wait at barriers for
a descheduled peer): quote runs whose repeats agree, or use `--threads 1` or
`OMP_WAIT_POLICY=PASSIVE` on a shared machine (docs/benchmarks.md).

Run: `python -m pdserve.bench.micro.engine_vs_hf [--threads 2] [--repeats 3] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

MODEL = "smollm2-135m-instruct"

# Prompt text; windows of it are cut at token level to get exact input lengths.
CORPUS = (
    "The history of computing is a story of layers. At the bottom, transistors switch on and "
    "off billions of times a second; above them, logic gates combine those switches into "
    "adders and multiplexers; above those, a processor fetches instructions, decodes them and "
    "executes them, one after another, while caches hide the slowness of main memory. "
    "Operating systems share that processor among many programs, giving each the illusion of "
    "a machine of its own. Compilers translate languages that people can read into the "
    "instructions the processor understands, and libraries package common tasks so that "
    "nobody has to write a sorting routine twice. Networks join machines into clusters, and "
    "clusters into data centres, where a single request from a phone may touch hundreds of "
    "servers before an answer comes back. Language models are a recent layer on this stack. "
    "A model reads a prompt, turns every word piece into a vector, and passes those vectors "
    "through dozens of attention and feed-forward blocks. Serving such a model well means "
    "keeping the expensive parts busy: the prompt is processed in one large pass, while the "
    "answer is produced one token at a time, each step reading every weight from memory. "
    "Batching many requests together amortises that reading, and a paged cache of keys and "
    "values lets requests of very different lengths share memory without waste. Scheduling "
    "decides which requests run in each step, how long a prompt chunk may be, and what to do "
    "when memory runs out. Good schedulers keep latency low for short requests while long "
    "ones still make progress, and they never let one user's giant prompt stall everybody "
    "else. Measuring all of this honestly is harder than it looks: machines are noisy, "
    "caches warm up, and a benchmark that reuses the same prompt may measure a cache instead "
    "of a model. "
)


@dataclass(slots=True)
class Workload:
    single_prompt: list[int]
    single_new_tokens: int
    mixed_prompts: list[list[int]]
    mixed_new_tokens: list[int]


@dataclass(slots=True)
class Timed:
    """Wall times of the repeats of one workload on one side, and the tokens of the first."""

    walls: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def build_workload(tokenizer, args: argparse.Namespace) -> Workload:
    """Deterministic prompts (token ids) and output lengths from `args.seed`."""
    ids = tokenizer.encode(CORPUS)
    while len(ids) < args.max_input + 1:
        ids = ids + ids
    rng = random.Random(args.seed)

    def window(n: int) -> list[int]:
        start = rng.randrange(0, len(ids) - n)
        return ids[start : start + n]

    in_lens = [rng.randint(args.min_input, args.max_input) for _ in range(args.num_prompts)]
    out_lens = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_prompts)]
    return Workload(
        single_prompt=ids[: args.single_input],
        single_new_tokens=args.single_output,
        mixed_prompts=[window(n) for n in in_lens],
        mixed_new_tokens=out_lens,
    )


# ---- the two sides -------------------------------------------------------------------------


class Ours:
    """`engine.LLM`, greedy with forced output lengths, prefix caching off."""

    def __init__(self, args: argparse.Namespace):
        from pdserve.engine import LLM

        self.llm = LLM(
            MODEL,
            enable_prefix_caching=False,
            num_blocks=args.num_blocks,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.num_prompts,
        )

    def generate(self, prompts: list[list[int]], new_tokens: list[int]) -> list[list[int]]:
        from pdserve.engine import SamplingParams

        params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n) for n in new_tokens]
        return [o.token_ids for o in self.llm.generate(prompts, params)]


class HF:
    """HF transformers' Llama on the same GGUF (dequantized to fp32), `generate` greedy."""

    def __init__(self, pad_token_id: int):
        import transformers

        from pdserve.engine.loader.registry import resolve_model_path

        transformers.logging.set_verbosity_error()
        path = resolve_model_path(MODEL)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()
        self.pad = pad_token_id

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: list[int]) -> list[list[int]]:
        """One left-padded batch; every row runs to `max(new_tokens)`, then is cut."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.int64)
        mask = torch.zeros((len(prompts), width), dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        n = max(new_tokens)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=self.pad,
        )
        return [out[i, width : width + k].tolist() for i, k in enumerate(new_tokens)]


# ---- measuring -----------------------------------------------------------------------------

Generate = Callable[[list[list[int]], list[int]], list[list[int]]]


def measure(
    sides: dict[str, Generate],
    prompts: list[list[int]],
    new_tokens: list[int],
    repeats: int,
    bar: tqdm,
    label: str,
) -> dict[str, Timed]:
    """Alternate the sides for `repeats` rounds; keep every wall time, tokens of round 1."""
    timed = {name: Timed() for name in sides}
    for r in range(repeats):
        for name, generate in sides.items():
            bar.set_description(f"{label} {name} {r + 1}/{repeats}")
            t0 = time.perf_counter()
            tokens = generate(prompts, new_tokens)
            timed[name].walls.append(time.perf_counter() - t0)
            if not timed[name].tokens:
                timed[name].tokens = tokens
            bar.update(1)
    return timed


def summarise_single(work: Workload, single: dict[str, Timed]) -> dict:
    n = work.single_new_tokens
    ours, hf = n / single["ours"].median, n / single["hf"].median
    return {
        "prompt_tokens": len(work.single_prompt), "new_tokens": n,
        "ours_tok_s": ours, "hf_tok_s": hf, "ratio": ours / hf,
        "ours_walls_s": single["ours"].walls, "hf_walls_s": single["hf"].walls,
        "tokens_identical": single["ours"].tokens == single["hf"].tokens,
    }


def summarise_mixed(work: Workload, mixed: dict[str, Timed]) -> dict:
    useful = sum(work.mixed_new_tokens)
    ours, hf = mixed["ours"].median, mixed["hf"].median
    return {
        "num_prompts": len(work.mixed_prompts),
        "prompt_lens": [len(p) for p in work.mixed_prompts],
        "new_tokens": work.mixed_new_tokens,
        "useful_tokens": useful,
        "hf_generated_tokens": len(work.mixed_prompts) * max(work.mixed_new_tokens),
        "ours_wall_s": ours, "hf_wall_s": hf, "ratio": hf / ours,
        "ours_useful_tok_s": useful / ours, "hf_useful_tok_s": useful / hf,
        "ours_walls_s": mixed["ours"].walls, "hf_walls_s": mixed["hf"].walls,
        "rows_identical": sum(a == b for a, b in zip(mixed["ours"].tokens, mixed["hf"].tokens)),
    }


def render_table(res: dict, repeats: int) -> str:
    """A markdown table; "ours/HF speed" is HF's time over ours (higher is better)."""
    b = res["batch1"]
    rows = [
        ("workload", f"metric (median of {repeats})", "ours", "HF", "ours/HF speed"),
        ("---", "---", "---:", "---:", "---:"),
        (f"batch 1 ({b['prompt_tokens']} in, {b['new_tokens']} out)", "tokens/s",
         f"{b['ours_tok_s']:.1f}", f"{b['hf_tok_s']:.1f}", f"{b['ratio']:.2f}x"),
    ]
    if m := res.get("mixed"):
        name = (f"{m['num_prompts']} mixed prompts ({min(m['prompt_lens'])}-"
                f"{max(m['prompt_lens'])} in, {min(m['new_tokens'])}-{max(m['new_tokens'])} out)")
        rows += [
            (name, "wall time (s)", f"{m['ours_wall_s']:.2f}", f"{m['hf_wall_s']:.2f}",
             f"{m['ratio']:.2f}x"),
            (name, f"useful tokens/s ({m['useful_tokens']} useful)",
             f"{m['ours_useful_tok_s']:.1f}", f"{m['hf_useful_tok_s']:.1f}",
             f"{m['ratio']:.2f}x"),
        ]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def machine_info(threads: int) -> dict:
    import transformers

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and workload")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixed workload")
    p.add_argument("--single-input", type=int, default=32, help="batch-1 prompt tokens")
    p.add_argument("--single-output", type=int, default=128, help="batch-1 new tokens")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--min-input", type=int, default=8)
    p.add_argument("--max-input", type=int, default=256)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="our engine's per-step token budget (chunked prefill)",
    )
    p.add_argument("--num-blocks", type=int, default=512, help="our engine's KV blocks")
    p.add_argument("--skip-mixed", action="store_true", help="run the batch-1 workload only")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"loading both models ({MODEL}, fp32, {args.threads} threads) ...", file=sys.stderr)
    ours = Ours(args)
    hf = HF(pad_token_id=ours.llm.engine.model_config.eos_token_ids[0])
    work = build_workload(ours.llm.tokenizer, args)
    sides: dict[str, Generate] = {"ours": ours.generate, "hf": hf.generate}
    for generate in sides.values():  # warm-up: first-call allocations, lazy inits
        generate([work.single_prompt], [8])

    runs = args.repeats * len(sides) * (1 if args.skip_mixed else 2)
    res: dict = {}
    with tqdm(total=runs, file=sys.stderr, unit="run") as bar:
        single = measure(sides, [work.single_prompt], [work.single_new_tokens],
                         args.repeats, bar, "batch 1")
        res["batch1"] = summarise_single(work, single)
        if not args.skip_mixed:
            mixed = measure(sides, work.mixed_prompts, work.mixed_new_tokens,
                            args.repeats, bar, "mixed")
            res["mixed"] = summarise_mixed(work, mixed)
    res["machine"] = machine_info(args.threads)
    res["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(render_table(res, args.repeats))
    if not res["batch1"]["tokens_identical"]:
        print("WARNING: batch-1 greedy tokens differ between our engine and HF transformers")
    if m := res.get("mixed"):
        print(f"mixed batch: HF generated {m['hf_generated_tokens']} tokens to deliver "
              f"{m['useful_tokens']} useful ones (a padded batch runs every row to the longest "
              f"output); {m['rows_identical']}/{m['num_prompts']} rows token-identical to ours")
    if args.json:
        args.json.write_text(json.dumps(res | {"workload": asdict(work)}, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repository root importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
