"""``python -m pdserve.bench``: run the benchmark, print the tables, write the JSON and plots.

``main(argv) -> int`` is the entry point (``pdserve bench`` calls it too). Bad input prints
one ``error: ...`` line to stderr and returns 2; nothing is sent in that case.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pdserve.bench.arrival import Arrival
from pdserve.bench.client import ServerUnreachable
from pdserve.bench.compare import (
    ClusterError,
    config_names,
    format_compare,
    run_compare,
    serve_command,
)
from pdserve.bench.metrics import summarize
from pdserve.bench.options import (
    UsageError,
    arrivals,
    build_parser,
    build_workload,
    check_backend,
    check_numbers,
)
from pdserve.bench.report import (
    format_summary,
    format_sweep,
    goodput_rate,
    run_to_dict,
    write_report,
)
from pdserve.bench.runner import RunResult, RunSettings, benchmark
from pdserve.bench.slo import SLO, parse_slo
from pdserve.bench.workloads import RequestSpec


@dataclasses.dataclass(slots=True)
class Plan:
    """Everything decided from the arguments before anything is sent."""

    args: argparse.Namespace
    slo: SLO
    arrivals: list[Arrival]
    requests: list[RequestSpec]
    warmup: list[RequestSpec]
    settings: RunSettings
    out_dir: Path
    config: dict[str, Any]
    sweep_requests: list[list[RequestSpec]]


def make_plan(argv: list[str] | None) -> Plan:
    """Parse and check the arguments and build the workload; raises on bad input."""
    args = build_parser().parse_args(argv)
    check_backend(args)
    check_numbers(args)
    slo = parse_slo(args.slo)
    runs = arrivals(args)
    workload = build_workload(args, args.seed, args.num_requests)
    # Each further rate of a sweep gets its own prompts (a distinct seed), so a prefix cache
    # on the server cannot answer rate k from the prompts of rate k-1.
    sweep = [workload.requests] + [
        build_workload(args, args.seed + 7919 * k, args.num_requests).requests
        for k in range(1, len(runs))
    ]
    # Warm-up uses another seed, so it does not pre-fill the cache with measured prompts.
    warmup = []
    if args.warmup:
        warmup = build_workload(args, args.seed + 1, args.warmup).requests[: args.warmup]
    print(workload.describe())
    settings = RunSettings(
        target=args.target,
        seed=args.seed,
        time_limit=args.time_limit,
        request_timeout=args.request_timeout,
        connect_timeout=args.connect_timeout,
        force_output_len=args.force_output_len,
        temperature=args.temperature,
        api_key=args.api_key,
        ca_file=args.ca_file,
        progress=args.progress,
        backend=args.backend,
        base_url=args.base_url,
        model=args.model,
    )
    out_dir = Path(args.out_dir or Path("bench", "results", time.strftime("%Y%m%d-%H%M%S")))
    config = {k: v for k, v in vars(args).items() if k != "api_key"}  # never store secrets
    config.update(
        slo=str(slo),
        workload_description=workload.describe(),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return Plan(args, slo, runs, workload.requests, warmup, settings, out_dir, config, sweep)


def run_against(plan: Plan, target: str) -> tuple[dict[str, Any], list[RunResult]]:
    """One full benchmark (warm-up and every arrival setting) against ``target``."""
    settings = dataclasses.replace(plan.settings, target=target)
    return asyncio.run(benchmark(settings, plan.requests, plan.arrivals, plan.warmup,
                                 plan.sweep_requests))


def report_runs(plan: Plan, name: str, health: dict[str, Any], results: list[RunResult]) -> list:
    """Print one config's tables, write its JSON; returns [(rate, summary)] per run."""
    title = f"{name}: {plan.args.workload}" + (f" [{health['mode']}]" if health.get("mode") else "")
    rated, stored = [], []
    for result in results:
        summary = summarize(result.records, plan.slo)
        rated.append((result.arrival.rate, summary))
        stored.append(run_to_dict(result, summary))
        print(format_summary(summary, f"{title}, {result.arrival.label}"))
        if result.stopped_by_time_limit:
            print(f"time limit hit: {len(result.records)} of {result.planned} requests sent")
    if len(results) > 1:
        print(format_sweep(rated))
    path = plan.out_dir / f"{name}.json"
    write_report(path, dict(plan.config, target_health=health, name=name), stored)
    print(f"report: {path}")
    return rated


def write_plots(plan: Plan, series: list[tuple[str, list[RunResult], list]]) -> None:
    """CDF plot (first run of each series) and, for a sweep, the rate plot."""
    from pdserve.bench.plots import plot_cdfs, plot_sweep

    multi = len(series) > 1
    cdf_series = []
    for name, results, _ in series:
        for result in results if not multi else results[:1]:
            label = f"{name} {result.arrival.label}" if multi else result.arrival.label
            cdf_series.append((label, result.records))
    plot_cdfs(cdf_series, plan.out_dir / "latency_cdf.png")
    if len(plan.arrivals) > 1:
        plot_sweep(
            [(name if multi else "", rated) for name, _, rated in series],
            plan.out_dir / "latency_vs_rate.png",
        )
    print(f"plots: {plan.out_dir}")


def execute(plan: Plan) -> int:
    """Run the benchmark (or the comparison) and report it."""
    args = plan.args
    if args.compare:
        names = config_names(args.compare)
        template = args.serve_command
        command = (
            (lambda config: shlex.split(template.replace("{config}", shlex.quote(config))))
            if template
            else serve_command
        )
        outcomes = run_compare(
            args.compare,
            lambda target: run_against(plan, target),
            plan.out_dir,
            command=command,
            start_timeout=args.cluster_start_timeout,
        )
    else:
        names, outcomes = ["bench"], [run_against(plan, args.target)]
    series = []
    for name, (health, results) in zip(names, outcomes, strict=True):
        series.append((name, results, report_runs(plan, name, health, results)))
    if args.compare:
        for index, arrival in enumerate(plan.arrivals):
            summaries = [rated[index][1] for _, _, rated in series]
            print(format_compare(names, summaries, f"compare, {arrival.label}"))
        if len(plan.arrivals) > 1:
            for name, _, rated in series:
                best = goodput_rate(rated)
                print(f"{name}: goodput rate " + (f"{best:g} req/s" if best else "none"))
    if args.plots:
        write_plots(plan, series)
    completed = sum(r.ok for _, results, _ in series for run in results for r in run.records)
    if completed == 0:
        print("error: no request completed; see the failures above", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m pdserve.bench``; returns the exit code (2 for bad input or no server)."""
    try:
        plan = make_plan(argv)
        return execute(plan)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError, FileNotFoundError, ServerUnreachable, ClusterError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
