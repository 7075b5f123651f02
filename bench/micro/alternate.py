"""Run the sides of an A/B micro-benchmark each in a fresh process, alternated round by
round (the order flipped every other round), so a drifting machine falls on both sides.

A side is `python -m <module> --child <side> <args>`; its last line of stdout is one JSON
object, its figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence


def run_sides(module: str, sides: Sequence[str], rounds: int, args: Sequence[str],
              show: Callable[[int, str, dict], None] | None = None) -> dict[str, list[dict]]:
    """Every side's figures, round by round; `show(round, side, figures)` as each lands."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else tuple(reversed(sides)):
            out = subprocess.run([sys.executable, "-m", module, "--child", side, *args],
                                 check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
            if show is not None:
                show(r + 1, side, runs[side][-1])
    return runs
