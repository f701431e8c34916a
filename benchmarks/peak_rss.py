"""The client's peak memory during one compute, each scheduler in a fresh process.

``python -m benchmarks.peak_rss --workload delayed-200k --scheduler threads [--quick]``
prints one JSON line: the process's resident memory before the compute, its peak during
the compute, and the compute's wall time.

The peak resident set size (RSS) is a high-water mark of the whole process, so it can only
be attributed to one scheduler's compute when nothing else ran in that process before:
the runner (``benchmarks.runner``) starts this module once per scheduler, and here the
process starts the scheduler (as the suite does, outside the measurement), builds the
collections, and then resets the kernel's high-water mark (``/proc/self/clear_refs``,
Linux) just before ``dask.compute``; the peak is read once the scheduler is closed
(``VmHWM``), so it covers the compute and whatever the scheduler finishes after it
returns (dask-serverless saves the run's report in the background), on top of the memory
the process already held. Where the mark cannot be reset the
peak is ``getrusage``'s ``ru_maxrss``, which also covers building the graph (the output
says which). Worker processes, the embedded Redis and a cluster's workers are other
processes and are not counted: this is the memory of the process that calls
``dask.compute``, which is the client for dask-serverless and distributed, and the whole
execution for the threaded scheduler.

It is the first compute of the workload in that process: dask-serverless plans it without
history (its embedded Redis is new), as a user's first run of a graph.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@dataclass(frozen=True)
class PeakRss:
    """One scheduler's client memory for one compute, in MB."""

    before_mb: float
    peak_mb: float
    seconds: float
    # Whether the peak covers only the compute (the high-water mark was reset before it).
    compute_only: bool

    @property
    def growth_mb(self) -> float:
        return max(0.0, self.peak_mb - self.before_mb)


def status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux ≥ 4.0)."""
    try:
        with open(_CLEAR_REFS, "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return status_mb("VmHWM") is not None


def max_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure_here(workload_name: str, scheduler_name: str, quick: bool) -> PeakRss:
    """Start the scheduler, build the workload, and measure one compute in this process."""
    from benchmarks.schedulers import OURS, STARTERS, start_dask_serverless_for_io
    from benchmarks.workloads import select_workloads

    (workload,) = select_workloads([workload_name])
    if scheduler_name == OURS and workload.io_bound:
        scheduler = start_dask_serverless_for_io()
        close = scheduler.close
    else:
        scheduler, close = STARTERS[scheduler_name]()
    try:
        collections = workload.build(quick)
        gc.collect()
        before = status_mb("VmRSS") or 0.0
        compute_only = reset_peak()
        started = time.perf_counter()
        dask.compute(*collections, scheduler=scheduler)
        seconds = time.perf_counter() - started
    finally:
        close()
    peak = status_mb("VmHWM") if compute_only else None
    return PeakRss(before, peak if peak is not None else max_rss_mb(), seconds, compute_only)


def measure(workload_name: str, scheduler_name: str, quick: bool) -> PeakRss:
    """``measure_here`` in a fresh Python process (see the module docstring)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.peak_rss",
        "--workload",
        workload_name,
        "--scheduler",
        scheduler_name,
        *(["--quick"] if quick else []),
    ]
    redis = dask.config.get("serverless.redis", None)
    if redis:
        command += ["--redis", str(redis)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, environment.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=root, env=environment
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise RuntimeError(f"peak RSS measurement failed: {tail[0]}")
    found: dict[str, Any] = json.loads(lines[-1])
    return PeakRss(**found)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peak_rss")
    parser.add_argument("--workload", required=True)
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis", help="the Redis dask-serverless runs on (as the suite's)")
    args = parser.parse_args(argv)
    if args.redis:
        dask.config.set({"serverless.redis": args.redis})
    found = measure_here(args.workload, args.scheduler, args.quick)
    print(
        json.dumps(
            {
                "before_mb": round(found.before_mb, 1),
                "peak_mb": round(found.peak_mb, 1),
                "seconds": round(found.seconds, 3),
                "compute_only": found.compute_only,
            }
        )
    )


if __name__ == "__main__":
    main()
