"""Write a small synthetic ShareGPT-format file for the ``file`` workload.

Nothing is downloaded: the text is made from a fixed word list with a seeded generator, so
the same seed always writes the same bytes. ``bench/data/sharegpt_sample.json`` in the repo
is the output of ``python -m pdserve.bench.make_sharegpt_sample``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "data" / "sharegpt_sample.json"

_WORDS = (
    "the a cluster request token cache prefill decode worker model batch latency memory "
    "block transfer router stream prompt answer system user question layer tensor kernel "
    "graph queue time fast slow large small first next every each why how what when which "
    "explain describe compare write list show give make use run send keep split move share "
    "is are was be can will should could would does do has have not and or but with for of "
    "to in on at by from into over under after before during between about please thanks"
).split()
_ASKS = ("Explain", "Describe", "Compare", "Write", "List", "Summarise", "Why does", "How can")


def _sentence(rng: random.Random, words: int) -> str:
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    return body[0].upper() + body[1:] + "."


def _text(rng: random.Random, words: int, opener: str = "") -> str:
    parts, left = [opener] if opener else [], words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        parts.append(_sentence(rng, n))
        left -= n
    return " ".join(parts)


def make_sample(num: int, seed: int) -> list[dict]:
    """``num`` conversations: a human question and a gpt reply, some with a second exchange."""
    rng = random.Random(seed)
    entries = []
    for i in range(num):
        turns = []
        for _ in range(2 if rng.random() < 0.25 else 1):
            ask = _text(rng, rng.randint(6, 110), opener=rng.choice(_ASKS))
            turns.append({"from": "human", "value": ask})
            turns.append({"from": "gpt", "value": _text(rng, rng.randint(8, 150))})
        entries.append({"id": f"synthetic-{i}", "conversations": turns})
    return entries


def main(argv: list[str] | None = None) -> int:
    """Write the sample file; prints where and how large."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--num", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(make_sample(args.num, args.seed), indent=1) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.num} conversations to {args.out} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
