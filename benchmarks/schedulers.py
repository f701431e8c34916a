"""The schedulers we compare, with explicit start-up and tear-down.

Each peer is started once, before any timing, so that a pool or cluster start-up never
lands in a per-graph time; start-up is timed on its own and reported separately.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType, ModuleType
from typing import Any

import dask
import dask.local
import dask.multiprocessing
import dask.threaded

OURS = "dask-serverless"


@dataclass(frozen=True)
class RunningScheduler:
    """A started scheduler: what to pass as ``dask.compute(..., scheduler=)`` and how to stop."""

    name: str
    scheduler: Any
    close: Callable[[], None]
    startup_s: float
    io_scheduler: Any = None

    def for_workload(self, io_bound: bool) -> Any:
        """The scheduler to use: the I/O-tuned variant for I/O-bound graphs, if any."""
        return self.io_scheduler if io_bound and self.io_scheduler is not None else self.scheduler


def cpu_count() -> int:
    """Worker count for the local pools (the machine's cores)."""
    return os.cpu_count() or 1


def _noop() -> None:
    """Trivial job used to force pool workers to exist before timing starts."""


def import_ours() -> ModuleType:
    """Import dask_serverless only when it is used.

    The package is optional here (it may not exist yet), and importing it by name at run
    time keeps the benchmarks independent of its internals, for mypy too.
    """
    return importlib.import_module("dask_serverless")


IO_CONCURRENCY = 64


def start_dask_serverless() -> tuple[Any, Callable[[], None]]:
    """Our scheduler with its defaults (the embedded Redis and local serverless pool)."""
    sched = import_ours().Scheduler()
    return sched, sched.close


def start_dask_serverless_for_io() -> Any:
    """Our scheduler as a user configures it for I/O-bound graphs: 64 instances on 2 cores."""
    return import_ours().Scheduler(concurrency=IO_CONCURRENCY)


def start_sync() -> tuple[Any, Callable[[], None]]:
    """Dask's single-threaded scheduler: the zero-overhead-parallelism baseline."""
    return dask.local.get_sync, _noop


def start_threads() -> tuple[Any, Callable[[], None]]:
    """Dask's threaded scheduler on an explicit pool of one thread per core."""
    pool = ThreadPoolExecutor(max_workers=cpu_count())
    return partial(dask.threaded.get, pool=pool), pool.shutdown


def start_processes() -> tuple[Any, Callable[[], None]]:
    """Dask's multiprocessing scheduler on a pool started (and warmed) once, not per graph."""
    pool = ProcessPoolExecutor(
        max_workers=cpu_count(), mp_context=dask.multiprocessing.get_context()
    )
    for future in [pool.submit(_noop) for _ in range(cpu_count())]:
        future.result()
    return partial(dask.multiprocessing.get, pool=pool), pool.shutdown


def start_distributed() -> tuple[Any, Callable[[], None]]:
    """A local dask.distributed cluster of 2 single-threaded worker processes.

    The client is not made the default so it cannot change how other schedulers' graphs
    are built (e.g. the shuffle method dask picks).
    """
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster, set_as_default=False)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def start_ray() -> tuple[Any, Callable[[], None]]:
    """Ray's Dask scheduler on a local Ray instance with two CPUs."""
    import ray
    from ray.util.dask import ray_dask_get

    ray.init(num_cpus=2)
    return ray_dask_get, ray.shutdown


STARTERS: Mapping[str, Callable[[], tuple[Any, Callable[[], None]]]] = MappingProxyType(
    {
        OURS: start_dask_serverless,
        "sync": start_sync,
        "threads": start_threads,
        "processes": start_processes,
        "distributed": start_distributed,
        "ray": start_ray,
    }
)
SCHEDULER_NAMES: tuple[str, ...] = tuple(STARTERS)


def unavailable_reason(name: str) -> str | None:
    """Why scheduler ``name`` cannot run here, or ``None`` when it can."""
    if name == OURS:
        try:
            dask_serverless = import_ours()
        except Exception as error:
            return f"dask_serverless is not importable ({type(error).__name__}: {error})"
        if not hasattr(dask_serverless, "Scheduler"):
            return "dask_serverless has no Scheduler yet"
    if name == "ray":
        try:
            import ray  # noqa: F401
            from ray.util.dask import ray_dask_get  # noqa: F401
        except ImportError as error:
            return f"ray is not importable ({error})"
    return None


def start(name: str) -> RunningScheduler:
    """Start scheduler ``name`` and measure how long that took."""
    started = time.perf_counter()
    scheduler, close = STARTERS[name]()
    startup_s = time.perf_counter() - started
    if name != OURS:
        return RunningScheduler(name, scheduler, close, startup_s)
    io_scheduler = start_dask_serverless_for_io()

    def close_both() -> None:
        close()
        io_scheduler.close()

    return RunningScheduler(name, scheduler, close_both, startup_s, io_scheduler)


def start_all(names: Sequence[str]) -> tuple[list[RunningScheduler], list[str]]:
    """Start every available scheduler; return them and one note per one skipped."""
    running: list[RunningScheduler] = []
    notes: list[str] = []
    for name in names:
        reason = unavailable_reason(name)
        if reason is None:
            try:
                running.append(start(name))
            except Exception as error:
                reason = f"start-up failed: {type(error).__name__}: {error}"
        if reason is not None:
            notes.append(f"skipping {name}: {reason}")
    return running, notes


def close_all(running: Sequence[RunningScheduler]) -> list[str]:
    """Stop every scheduler, even when one fails to stop; return one note per failure."""
    notes = []
    for sched in running:
        try:
            sched.close()
        except Exception as error:
            notes.append(f"closing {sched.name} failed: {type(error).__name__}: {error}")
    return notes
