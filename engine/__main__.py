"""`python -m pdserve.engine "prompt"`: generate text offline with the paged engine, streaming
it."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader.registry import UnknownModelError
from pdserve.engine.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.engine", description=__doc__)
    ap.add_argument("prompt", nargs="?", default="Explain in two sentences why the sky is blue.")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--raw", action="store_true", help="send the prompt as is (no chat template)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.threads,
                                        cache=CacheConfig(memory_bytes=64 << 20)))
        prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
        engine.add_request("cli", prompt, params)
    except (ValueError, UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    n = 0
    last = None
    while engine.has_unfinished():
        for out in engine.step():
            print(out.new_text, end="", flush=True)
            n += len(out.new_token_ids)
            last = out
    dt = time.perf_counter() - t0
    print(f"\n[{last.finish_reason if last else '?'}: {n} tokens in {dt:.2f}s, "
          f"{n / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
