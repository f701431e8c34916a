"""Time a 5 000-leaf ``dask.delayed`` tree reduction on three schedulers.

``python -m benchmarks.tree_reduction`` — a small standalone check of per-task overhead:
dask-serverless (embedded default ``dask_serverless.get``), Dask's threaded scheduler and a
2×1 ``distributed.LocalCluster`` that is started before the clock runs. Median of 3 runs,
after one untimed warm-up run each.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import dask
import dask.threaded

from benchmarks.schedulers import import_ours
from benchmarks.workloads import delayed_add, noop, tree_reduce

LEAVES = 5_000
REPEAT = 3


def build_tree() -> Any:
    """5 000 no-op leaves summed pairwise: about 10 000 tasks of pure overhead."""
    return tree_reduce([dask.delayed(noop)(i) for i in range(LEAVES)], delayed_add)


def median_time(scheduler: Any) -> float:
    """Median wall time of ``REPEAT`` computes, after one untimed warm-up."""
    expected = LEAVES * (LEAVES - 1) // 2
    times = []
    for attempt in range(REPEAT + 1):
        tree = build_tree()
        started = time.perf_counter()
        (total,) = dask.compute(tree, scheduler=scheduler)
        elapsed = time.perf_counter() - started
        if total != expected:
            raise RuntimeError(f"wrong result {total!r}, expected {expected}")
        if attempt:
            times.append(elapsed)
    return statistics.median(times)


def time_serverless() -> float:
    """dask-serverless through its embedded default get function."""
    return median_time(import_ours().get)


def time_threads() -> float:
    """Dask's threaded scheduler."""
    return median_time(dask.threaded.get)


def time_distributed() -> float:
    """A local cluster of 2 single-threaded worker processes, started before timing."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        return median_time(client)


def main() -> int:
    """Print one row per scheduler: median seconds and µs per task."""
    tasks = 2 * LEAVES - 1
    timers: dict[str, Callable[[], float]] = {
        "dask-serverless": time_serverless,
        "threads": time_threads,
        "distributed": time_distributed,
    }
    print(f"tree reduction: {LEAVES} leaves, {tasks} tasks, median of {REPEAT}")
    print(f"{'scheduler':<16}{'median s':>10}{'µs/task':>10}")
    for name, timer in timers.items():
        try:
            median = timer()
        except Exception as error:
            print(f"{name:<16}{'—':>10}{'—':>10}  ({type(error).__name__}: {error})")
            continue
        print(f"{name:<16}{median:>10.3f}{median / tasks * 1e6:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
