"""PNG plots: latency CDFs, and TTFT/TPOT percentiles against request rate.

matplotlib is imported inside the functions (with the Agg backend, no display needed) so
that the rest of the benchmark works, and starts fast, without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import e2e, tpot, ttft
from pdserve.bench.records import RequestRecord


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(series: Sequence[tuple[str, Sequence[RequestRecord]]], path: Path) -> None:
    """TTFT, TPOT and E2E CDFs of completed requests, one line per labelled series."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (name, figure) in zip(
        axes, (("TTFT", ttft), ("TPOT", tpot), ("E2E", e2e)), strict=True
    ):
        for label, records in series:
            values = sorted(v * 1000 for r in records if r.ok and (v := figure(r)) is not None)
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, fractions, where="post", label=label)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} CDF")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(
    series: Sequence[tuple[str, Sequence[tuple[float, dict[str, Any]]]]], path: Path
) -> None:
    """TTFT and TPOT p50/p90 against request rate; each series is (label, [(rate, summary)])."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (name, key) in zip(axes, (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms")), strict=True):
        for number, (label, points) in enumerate(series):
            color = f"C{number % 10}"  # one colour per series; p50 solid, p90 dashed
            rates = [rate for rate, _ in points]
            for pct, style in (("p50", "-o"), ("p90", "--s")):
                values = [s[key][pct] for _, s in points]
                plotted = [(r, v) for r, v in zip(rates, values, strict=True) if v is not None]
                if plotted:
                    xs, ys = zip(*plotted, strict=True)
                    ax.plot(xs, ys, style, color=color, label=f"{label} {pct}".strip())
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} vs request rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
