"""Command line: ``python -m benchmarks [--quick] [--json FILE] [--only NAME…] [--redis URL] …``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import dask.config

from benchmarks.runner import render, run, write_json
from benchmarks.schedulers import SCHEDULER_NAMES
from benchmarks.workloads import select_workloads, workload_names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time Dask workloads on dask-serverless and its peers in one run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 repetitions and smaller sizes (< 5 min)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", choices=workload_names(), help="workloads to run"
    )
    parser.add_argument(
        "--schedulers",
        nargs="+",
        metavar="NAME",
        choices=SCHEDULER_NAMES,
        default=list(SCHEDULER_NAMES),
        help=f"schedulers to compare (default: all of {', '.join(SCHEDULER_NAMES)})",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="run dask-serverless on this Redis (a server or any node of a Redis Cluster) "
        "instead of its embedded one",
    )
    parser.add_argument(
        "--repeat", type=int, metavar="N", help="timed runs per pair (default 5, --quick 3)"
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; exit status 1 when any workload failed on any scheduler."""
    args = parse_args(argv)
    if args.redis:
        # Every Scheduler the suite starts reads its Redis from the configuration.
        dask.config.set({"serverless.redis": args.redis})
    report = run(select_workloads(args.only), args.schedulers, args.repeat, args.quick)
    print(render(report))
    if args.json:
        write_json(report, args.json)
        print(f"\nwrote {args.json}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
