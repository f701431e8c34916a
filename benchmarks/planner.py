"""Planner benchmark: critical-path against uniform-at-the-largest-size, same SLA.

``python -m benchmarks.planner [--repeat N] [--heavy-s S]``

The workflow has a CPU-heavy critical path (a chain of tasks that compute for about
``--heavy-s`` seconds each at one vCPU) and light side branches (short chains of tasks that
wait on I/O — they sleep) that all feed one final task. After warm-up runs that build
history, it runs ``uniform`` at the largest configuration and ``critical-path`` under the
same SLA, alternating, and prints the mean actual makespan and cost (GB-s) of each side by
side. Target: at least 30 % lower cost at no more than 10 % longer makespan.

It also times planning a 10 000-task DAG against ``dask.order.order`` on the same graph.

Memory configurations are only real where the local backend can write cgroups (Linux,
root); elsewhere the table says "unthrottled" and the comparison means little.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import dask.order
from dask._task_spec import Task, TaskRef

from dask_serverless import Scheduler
from dask_serverless.graph import translate
from dask_serverless.planning import (
    SLA,
    CpuModel,
    CriticalPathPlanner,
    Deadline,
    History,
    PlanInputs,
    Predictor,
)
from dask_serverless.planning.history import function_identities

HEAVY_CHAIN = 4
SIDE_BRANCHES = 6
SIDE_LENGTH = 2
LIGHT_S = 0.1


def compute(loops: int, *parents: int) -> int:
    """CPU-bound: a pure-Python loop (one thread)."""
    total = 0
    for i in range(loops):
        total += i * i
    return total % 7 + sum(parents)


def wait(seconds: float, *parents: int) -> int:
    """I/O-bound: sleeps, so its time does not depend on the CPU share."""
    time.sleep(seconds)
    return 1 + sum(parents)


def loops_for(seconds: float) -> int:
    """How many ``compute`` loops take about ``seconds`` on this machine, at full speed."""
    loops = 200_000
    start = time.perf_counter()
    compute(loops)
    return int(loops * seconds / (time.perf_counter() - start))


def workflow(loops: int) -> tuple[dict, str]:
    """A heavy chain (the critical path) next to light side branches, joined at the end."""
    graph: dict = {}
    for step in range(HEAVY_CHAIN):
        parent = (TaskRef(("heavy", step - 1)),) if step else ()
        graph[("heavy", step)] = Task(("heavy", step), compute, loops, *parent)
    ends = [TaskRef(("heavy", HEAVY_CHAIN - 1))]
    for branch in range(SIDE_BRANCHES):
        for step in range(SIDE_LENGTH):
            key = ("light", branch, step)
            parent = (TaskRef(("light", branch, step - 1)),) if step else ()
            graph[key] = Task(key, wait, LIGHT_S, *parent)
        ends.append(TaskRef(("light", branch, SIDE_LENGTH - 1)))
    graph["join"] = Task("join", wait, 0.01, *ends)
    return graph, "join"


def compare(repeat: int, heavy_s: float, sla: str, deadline: str) -> list[list[str]]:
    loops = loops_for(heavy_s)
    graph, key = workflow(loops)
    rows = []
    options: dict[str, Any] = {"concurrency": 8, "sla": sla, "deadline": deadline, "timeout": 600}
    with Scheduler(planner="uniform-3008", **options) as uniform:
        # Both Schedulers share the embedded Redis of the first, and so its history.
        redis_url = uniform._redis.connection_pool.connection_kwargs
        url = f"redis://{redis_url.get('host', 'localhost')}:{redis_url.get('port', 6379)}"
        if "path" in redis_url:
            url = f"unix://{redis_url['path']}"
        with Scheduler(redis=url, planner="critical-path", **options) as planned:
            # Warm-up: history at the largest and the smallest size, then planned runs.
            for _ in range(2):
                uniform.get(graph, key)
            with Scheduler(redis=url, planner="uniform-512", **options) as smallest:
                smallest.get(graph, key)
            for _ in range(3):
                planned.get(graph, key)
            results: dict[str, list[tuple[float, float]]] = {"uniform": [], "planned": []}
            for _ in range(repeat):
                for name, sched in (("uniform", uniform), ("planned", planned)):
                    sched.get(graph, key)
                    run = sched.last_run
                    assert run is not None
                    results[name].append((run.actual_makespan_s, run.cost_gb_s))
            print(planned.last_run)
            throttled = "" if getattr(uniform.backend, "throttled", True) else " (unthrottled)"
            for name, label in (("uniform", "uniform 3008 MB"), ("planned", "critical-path")):
                makespan = statistics.mean(m for m, _ in results[name])
                cost = statistics.mean(c for _, c in results[name])
                rows.append([label + throttled, f"{makespan:.3f}", f"{cost:.3f}"])
            base_m, base_c = (float(v) for v in rows[0][1:])
            plan_m, plan_c = (float(v) for v in rows[1][1:])
            rows.append(
                [
                    "critical-path vs uniform",
                    f"{plan_m / base_m - 1:+.1%}",
                    f"{plan_c / base_c - 1:+.1%}",
                ]
            )
    return rows


def planning_speed(size: int = 10_000) -> tuple[float, float]:
    """Seconds to plan a ``size``-task DAG (critical-path) and to ``dask.order.order`` it."""
    width = 100
    graph: dict = {}
    for i in range(size):
        layer, column = divmod(i, width)
        parents = (
            [TaskRef(("t", (layer - 1) * width + (column + d) % width)) for d in (0, 1)]
            if layer
            else []
        )
        graph[("t", i)] = Task(("t", i), compute, 1, *parents)
    last_layer = [("t", i) for i in range(size - width, size)]
    graph["end"] = Task("end", wait, 0, *(TaskRef(k) for k in last_layer))
    start = time.perf_counter()
    dask.order.order(graph)
    order_s = time.perf_counter() - start
    dag = translate(graph, "end")
    functions = function_identities(dag)
    configs = (512, 1024, 1769, 3008)
    samples = {
        (f, m): [[8, 8, 0.01 * 1769 / min(m, 1769)]] * 5
        for f in set(functions)
        if f
        for m in configs
    }
    start = time.perf_counter()
    predictor = Predictor(History(tasks=samples), SLA.parse("p95"), CpuModel())
    inputs = PlanInputs(dag, functions, predictor, configs, SLA.parse("p95"), Deadline.parse(None))
    CriticalPathPlanner().plan(inputs)
    plan_s = time.perf_counter() - start
    return plan_s, order_s


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planner")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per planner")
    parser.add_argument("--heavy-s", type=float, default=0.4, help="seconds per heavy task")
    parser.add_argument("--sla", default="p95", help="the SLA both planners run under")
    parser.add_argument("--deadline", default="fastest+5%", help="the makespan target")
    args = parser.parse_args(argv)
    plan_s, order_s = planning_speed()
    print(
        f"planning 10 000 tasks (critical-path): {plan_s:.3f} s; dask.order.order: "
        f"{order_s:.3f} s ({plan_s / order_s:.1f}x)\n"
    )
    rows = compare(args.repeat, args.heavy_s, args.sla, args.deadline)
    print()
    label = f"planner (SLA {args.sla}, deadline {args.deadline})"
    print(table([label, "makespan s", "cost GB-s"], rows))


if __name__ == "__main__":
    main()
