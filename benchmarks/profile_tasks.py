"""Where the per-task time of a workload goes, client and workers, in one profile.

``python -m benchmarks.profile_tasks [--workload noop-tree] [--quick] [--top 25]``

The workers normally live in other processes, out of a profiler's sight. Here the inline
backend (``Scheduler(backend="inline")``) runs every invocation in this process, one after
another, with the same worker, Redis scripts and record as the local pool (only the pipe
to an instance and the parallelism are left out), so one cProfile sees the whole path of
a task:
the client translating, planning and signing, the workers loading the record,
gathering, executing, publishing and reporting. The output groups the profile by stage
and divides each stage by the task count.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Sequence

from benchmarks.schedulers import import_ours
from benchmarks.workloads import WORKLOADS, compute, count_tasks

# Stages of a task's life, by the functions whose cumulative time they are.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("client: translate (incl. dask's graph optimization)", "graph.py", "translate"),
    ("client: plan", "planning/__init__.py", "plan"),
    ("client: sign the record", "record.py", "seal_record"),
    ("client: finish (history, report)", "planning/__init__.py", "finish"),
    ("worker: load the run record", "serialize.py", "loads"),
    ("worker: gather inputs", "loop.py", "gather"),
    ("worker: execute", "loop.py", "execute"),
    ("worker: publish (Redis script, events)", "loop.py", "publish"),
    ("worker: metrics", "metrics.py", "done"),
    ("worker: task slot / OOM note", "resources.py", "note"),
    ("worker: split and share", "loop.py", "split"),
    ("worker: whole branch loop", "loop.py", "run_branch"),
)


def stage_table(stats: pstats.Stats, tasks: int) -> list[tuple[str, float, float]]:
    """``(stage, seconds, µs per task)`` from the cumulative times in ``stats``."""
    found: dict[str, float] = {}
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, _tt, cumulative, _callers) in raw.items():
        for stage, suffix, name in STAGES:
            if function == name and filename.endswith(suffix):
                found[stage] = found.get(stage, 0.0) + cumulative
    return [
        (stage, found.get(stage, 0.0), found.get(stage, 0.0) / tasks * 1e6) for stage, *_ in STAGES
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_tasks")
    parser.add_argument("--workload", default="noop-tree", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--quick", action="store_true", help="the --quick size of the workload")
    parser.add_argument("--top", type=int, default=25, help="functions to list by own time")
    args = parser.parse_args(argv)
    workload = next(w for w in WORKLOADS if w.name == args.workload)
    ours = import_ours()
    # Two workers' worth of concurrency for the plan and the workers' load checks, as the
    # smallest local pool would have; the invocations still run one at a time.
    with ours.Scheduler(backend="inline", concurrency=2) as sched:
        tasks = count_tasks(workload.build(args.quick), workload.sequential) or 1
        for _ in range(2):  # warm-up, and history for the planner
            compute(workload, workload.build(args.quick), sched)
        collections_ = workload.build(args.quick)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        compute(workload, collections_, sched)
        profiler.disable()
        wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    print(f"{workload.name}: {tasks} tasks, {wall:.3f} s in one process under cProfile")
    print(f"{'stage':55} {'s':>8} {'µs/task':>8}")
    for stage, seconds, per_task in stage_table(stats, tasks):
        print(f"{stage:55} {seconds:8.3f} {per_task:8.1f}")
    print()
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
