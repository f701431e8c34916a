"""Cold and warm starts of the local platform, each measured in a fresh client process.

``python -m benchmarks.local_start [--repeat N]`` prints, per repetition, the first
compute of a new Scheduler (a cold start: the fork server imports the worker and the
scientific stack the client loaded, then forks an instance), the median compute on a warm
instance, and the first compute of a second Scheduler in the same process (the fork server
is already running). The ratio that matters is cold start over the bare import of the
worker in a fresh interpreter: the platform adds about one such import to a first compute,
never one per instance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CLIENT = """
import json, os, time
import numpy, dask, dask.array
import dask_serverless

def pid():
    return os.getpid()

started = time.perf_counter()
with dask_serverless.Scheduler(concurrency=1) as first:
    dask.compute(dask.delayed(pid)(), scheduler=first)
    cold = time.perf_counter() - started
    warm = []
    for _ in range(9):
        t = time.perf_counter()
        dask.compute(dask.delayed(pid)(), scheduler=first)
        warm.append(time.perf_counter() - t)
    with dask_serverless.Scheduler(concurrency=1) as second:
        t = time.perf_counter()
        dask.compute(dask.delayed(pid)(), scheduler=second)
        again = time.perf_counter() - t
print(json.dumps({"cold": cold, "warm": sorted(warm)[4], "second": again}))
"""
IMPORT = "import numpy, dask.array, dask_serverless.backends.local.instance"


def measure() -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT], capture_output=True, text=True, check=True, timeout=300
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORT], check=True, timeout=300)
    result["import"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.local_start")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [measure() for _ in range(args.repeat)]
    print(f"{'cold s':>8} {'warm ms':>8} {'2nd sched s':>11} {'import s':>9} {'cold/import':>11}")
    for row in rows:
        print(
            f"{row['cold']:8.3f} {row['warm'] * 1000:8.1f} {row['second']:11.3f} "
            f"{row['import']:9.3f} {row['cold'] / row['import']:11.2f}"
        )
    ratio = statistics.median(row["cold"] / row["import"] for row in rows)
    print(f"median cold start / worker import: {ratio:.2f}")


if __name__ == "__main__":
    main()
