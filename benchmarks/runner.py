"""Timing loop, result tables and the JSON report.

All schedulers run in one process run and take turns within every repetition, so slow
phases of a shared, noisy machine hit all of them alike; that is why the targets are the
ratios between schedulers of the same run, not absolute times.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import pandas as pd

from benchmarks.peak_rss import PeakRss, measure
from benchmarks.schedulers import OURS, RunningScheduler, close_all, start_all
from benchmarks.workloads import Workload, compute, count_tasks


@dataclass(frozen=True)
class Result:
    """All timed runs of one workload on one scheduler."""

    workload: str
    scheduler: str
    tasks: int
    runs_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """Median wall time: robust against the odd run disturbed by a noisy neighbour."""
        return statistics.median(self.runs_s)


@dataclass(frozen=True)
class Report:
    """Everything one benchmark run produced, ready to print or save."""

    machine: dict[str, Any]
    schedulers: tuple[str, ...]
    startup_s: dict[str, float]
    workloads: tuple[Workload, ...]
    tasks: dict[str, int]
    results: tuple[Result, ...]
    notes: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()
    # Client peak RSS by (workload, scheduler), for workloads with a memory target.
    memory: dict[tuple[str, str], PeakRss] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What benchmarking one workload produced."""

    tasks: int
    results: list[Result]
    notes: list[str]
    failures: list[str]
    memory: dict[str, PeakRss] = field(default_factory=dict)


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


def describe(error: BaseException) -> str:
    """One line for an exception: type, message and the innermost frame."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def results_match(expected: Any, actual: Any) -> bool:
    """Whether two computed values agree, with float tolerance.

    Used on warm-up results so a fast but wrong scheduler cannot go unnoticed.
    """
    if isinstance(expected, pd.DataFrame | pd.Series):
        if type(expected) is not type(actual):
            return False
        try:
            if isinstance(expected, pd.DataFrame):
                pd.testing.assert_frame_equal(
                    expected.sort_index(), actual.sort_index(), check_exact=False
                )
            else:
                pd.testing.assert_series_equal(
                    expected.sort_index(), actual.sort_index(), check_exact=False
                )
        except AssertionError:
            return False
        return True
    if isinstance(expected, np.ndarray | np.generic | float):
        expected_array, actual_array = np.asarray(expected), np.asarray(actual)
        if expected_array.shape != actual_array.shape:
            return False
        if expected_array.dtype.kind in "fc":
            return bool(np.allclose(expected_array, actual_array, rtol=1e-7, equal_nan=True))
        return bool(np.array_equal(expected_array, actual_array))
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(results_match(expected[key], actual[key]) for key in expected)
        )
    if isinstance(expected, list | tuple):
        return (
            isinstance(actual, list | tuple)
            and len(expected) == len(actual)
            and all(results_match(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


def time_compute(workload: Workload, quick: bool, scheduler: Any) -> float:
    """Wall time of one ``dask.compute`` of a freshly built graph (of all the computes of a
    ``sequential`` workload).

    Building the collections happens before the clock starts: it is the same user code
    for every scheduler and not what we compare.
    """
    collections = workload.build(quick)
    gc.collect()
    started = time.perf_counter()
    compute(workload, collections, scheduler)
    return time.perf_counter() - started


def rotated(items: Sequence[RunningScheduler], shift: int) -> list[RunningScheduler]:
    """``items`` starting at position ``shift`` (so no scheduler always goes first)."""
    shift %= max(len(items), 1)
    return [*items[shift:], *items[:shift]]


def warm_up(
    workload: Workload, quick: bool, running: Sequence[RunningScheduler]
) -> tuple[list[RunningScheduler], list[str], list[str]]:
    """One untimed run per scheduler (imports, caches, worker start-up).

    Returns the schedulers that computed the workload, notes on results that disagree
    with the first scheduler's, and one failure line per scheduler that raised.
    """
    healthy: list[RunningScheduler] = []
    notes: list[str] = []
    failures: list[str] = []
    reference: tuple[str, Any] | None = None
    for sched in running:
        try:
            value = compute(workload, workload.build(quick), sched.for_workload(workload.io_bound))
        except Exception as error:
            failures.append(f"{workload.name} on {sched.name}: {describe(error)}")
            continue
        if reference is None:
            reference = (sched.name, value)
        elif not results_match(reference[1], value):
            notes.append(f"{workload.name}: result on {sched.name} differs from {reference[0]}'s")
        healthy.append(sched)
    return healthy, notes, failures


def benchmark_workload(
    workload: Workload, quick: bool, running: Sequence[RunningScheduler], repeat: int
) -> Outcome:
    """Warm up, then time ``repeat`` rounds in which every scheduler runs once."""
    tasks = count_tasks(workload.build(quick), workload.sequential)
    healthy, notes, failures = warm_up(workload, quick, running)
    runs: dict[str, list[float]] = {sched.name: [] for sched in healthy}
    broken: set[str] = set()
    for repetition in range(repeat):
        for sched in rotated(healthy, repetition):
            if sched.name in broken:
                continue
            try:
                runs[sched.name].append(
                    time_compute(workload, quick, sched.for_workload(workload.io_bound))
                )
            except Exception as error:
                broken.add(sched.name)
                failures.append(f"{workload.name} on {sched.name}: {describe(error)}")
    results = [
        Result(workload.name, sched.name, tasks, tuple(runs[sched.name]))
        for sched in healthy
        if sched.name not in broken
    ]
    summary = ", ".join(f"{result.scheduler} {result.median_s:.3f}s" for result in results)
    progress(f"{workload.name} ({tasks} tasks): {summary or 'no results'}")
    memory: dict[str, PeakRss] = {}
    if workload.memory_target is not None:
        for sched in healthy:
            try:
                memory[sched.name] = measure(workload.name, sched.name, quick)
            except Exception as error:
                failures.append(f"{workload.name} peak RSS on {sched.name}: {describe(error)}")
                continue
            progress(
                f"{workload.name}: client peak RSS on {sched.name} "
                f"{memory[sched.name].peak_mb:.0f} MB"
            )
    return Outcome(tasks, results, notes, failures, memory)


def _version_of(package: str) -> str | None:
    """A peer's installed version, or None: the peers come with the ``[bench]`` extra,
    and the suite's install (``[test]``) imports this module without them."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(quick: bool, repeat: int) -> dict[str, Any]:
    """Where and how the numbers were taken (they mean little without it)."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": _version_of("distributed"),
        "ray": _version_of("ray"),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "repeat": repeat,
    }


def run(
    workloads: Sequence[Workload], scheduler_names: Sequence[str], repeat: int, quick: bool
) -> Report:
    """Start the schedulers, benchmark every workload on all of them, stop them."""
    running, notes = start_all(scheduler_names)
    for note in notes:
        progress(note)
    tasks: dict[str, int] = {}
    results: list[Result] = []
    failures: list[str] = []
    memory: dict[tuple[str, str], PeakRss] = {}
    try:
        for workload in workloads:
            outcome = benchmark_workload(workload, quick, running, repeat)
            tasks[workload.name] = outcome.tasks
            results.extend(outcome.results)
            memory.update({(workload.name, name): peak for name, peak in outcome.memory.items()})
            notes.extend(outcome.notes)
            failures.extend(outcome.failures)
    finally:
        notes.extend(close_all(running))
    if quick:
        notes.extend(
            f"--quick: {workload.name} uses {workload.quick_note}"
            for workload in workloads
            if workload.quick_note
        )
    return Report(
        machine=machine_info(quick, repeat),
        schedulers=tuple(sched.name for sched in running),
        startup_s={sched.name: sched.startup_s for sched in running},
        workloads=tuple(workloads),
        tasks=tasks,
        results=tuple(results),
        notes=tuple(notes),
        failures=tuple(failures),
        memory=memory,
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def seconds(result: Result | None) -> str:
    """A median-time cell, or a dash when there is no measurement."""
    return "—" if result is None else f"{result.median_s:.3f}"


def lookup(report: Report) -> dict[tuple[str, str], Result]:
    """Results keyed by (workload, scheduler)."""
    return {(result.workload, result.scheduler): result for result in report.results}


def ratio(ours: Result | None, peer: Result | None) -> str:
    """Our median divided by a peer's (below 1: we are faster)."""
    if ours is None or peer is None or peer.median_s <= 0:
        return "—"
    return f"{ours.median_s / peer.median_s:.2f}"


def times_table(report: Report) -> str:
    """Median wall time per scheduler, then our time ÷ each peer's."""
    by_key = lookup(report)
    peers = [name for name in report.schedulers if name != OURS]
    with_ratios = OURS in report.schedulers
    headers = ["workload", "tasks", *report.schedulers]
    if with_ratios:
        headers += [f"÷{peer}" for peer in peers]
    rows = []
    for workload in report.workloads:
        name = workload.name
        row = [name, str(report.tasks[name])]
        row += [seconds(by_key.get((name, sched))) for sched in report.schedulers]
        if with_ratios:
            ours = by_key.get((name, OURS))
            row += [ratio(ours, by_key.get((name, peer))) for peer in peers]
        rows.append(row)
    return format_table(headers, rows)


def overhead_table(report: Report) -> str:
    """Median time per task in µs, for the workloads whose tasks do nothing."""
    by_key = lookup(report)
    rows = []
    for workload in report.workloads:
        if not workload.per_task:
            continue
        row = [workload.name, str(report.tasks[workload.name])]
        for sched in report.schedulers:
            result = by_key.get((workload.name, sched))
            row.append("—" if result is None else f"{result.median_s / result.tasks * 1e6:.0f}")
        rows.append(row)
    if not rows:
        return ""
    return format_table(["µs per task", "tasks", *report.schedulers], rows)


def startup_table(report: Report) -> str:
    """Scheduler / cluster start-up, kept out of every per-graph time."""
    rows = [[name, f"{report.startup_s[name]:.3f}"] for name in report.schedulers]
    return format_table(["scheduler", "start-up s"], rows)


def memory_ratio(report: Report, workload: str, peer: str) -> str:
    """Our client peak RSS divided by a peer's for ``workload``."""
    ours, theirs = report.memory.get((workload, OURS)), report.memory.get((workload, peer))
    if ours is None or theirs is None or theirs.peak_mb <= 0:
        return "—"
    return f"{ours.peak_mb / theirs.peak_mb:.2f}"


def targets_table(report: Report) -> str:
    """Workloads with a target (ours at most N × a peer): the ratio and whether it held."""
    by_key = lookup(report)
    rows = []
    for workload in report.workloads:
        checks = []
        if workload.target is not None:
            peer, limit = workload.target
            ours, theirs = by_key.get((workload.name, OURS)), by_key.get((workload.name, peer))
            checks.append((f"÷{peer} ≤ {limit:g}", ratio(ours, theirs), limit))
        if workload.memory_target is not None:
            peer, limit = workload.memory_target
            measured = memory_ratio(report, workload.name, peer)
            checks.append((f"peak RSS ÷{peer} ≤ {limit:g}", measured, limit))
        for target, measured, limit in checks:
            met = "—" if measured == "—" else "met" if float(measured) <= limit else "MISSED"
            rows.append([workload.name, target, measured, met])
    if not rows:
        return ""
    return format_table(["workload", "target", "measured", "result"], rows)


def memory_table(report: Report) -> str:
    """Client peak RSS during one compute (fresh process per scheduler), and before it."""
    rows = []
    for workload in report.workloads:
        for sched in report.schedulers:
            found = report.memory.get((workload.name, sched))
            if found is None:
                continue
            rows.append(
                [
                    workload.name,
                    sched,
                    f"{found.before_mb:.0f}",
                    f"{found.peak_mb:.0f}",
                    f"{found.growth_mb:.0f}",
                    f"{found.seconds:.2f}",
                    "compute" if found.compute_only else "process",
                ]
            )
    if not rows:
        return ""
    headers = ["client RSS (MB)", "scheduler", "before", "peak", "growth", "compute s", "peak of"]
    return format_table(headers, rows)


def render(report: Report) -> str:
    """The full text report: settings, notes, the three tables and any failures."""
    machine = report.machine
    header = (
        f"dask {machine['dask']} · python {machine['python']} · {machine['cpu_count']} cores · "
        f"median of {machine['repeat']} runs{' · --quick' if machine['quick'] else ''}"
    )
    sections = [header]
    if report.notes:
        sections.append("\n".join(f"note: {note}" for note in report.notes))
    sections.append(
        "median wall time (s)" + (", and ours ÷ peer" if OURS in report.schedulers else "")
    )
    sections.append(times_table(report))
    overhead = overhead_table(report)
    if overhead:
        sections.append(overhead)
    memory = memory_table(report)
    if memory:
        sections.append(memory)
    targets = targets_table(report)
    if targets:
        sections.append(targets)
    sections.append(startup_table(report))
    if report.failures:
        sections.append("\n".join(f"FAILED {failure}" for failure in report.failures))
    return "\n\n".join(sections)


def to_json(report: Report) -> dict[str, Any]:
    """The machine description and one record per (workload, scheduler)."""
    return {
        "machine": report.machine,
        "results": [
            {
                "workload": result.workload,
                "scheduler": result.scheduler,
                "tasks": result.tasks,
                "median_s": result.median_s,
                "runs_s": list(result.runs_s),
                **memory_fields(report.memory.get((result.workload, result.scheduler))),
            }
            for result in report.results
        ],
    }


def memory_fields(found: PeakRss | None) -> dict[str, Any]:
    """The JSON fields of a client peak RSS measurement (none when not measured)."""
    if found is None:
        return {}
    return {
        "client_rss_before_mb": found.before_mb,
        "client_peak_rss_mb": found.peak_mb,
        "client_peak_rss_compute_only": found.compute_only,
    }


def write_json(report: Report, path: str) -> None:
    """Save the JSON report (see :func:`to_json`)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(to_json(report), handle, indent=2)
        handle.write("\n")
