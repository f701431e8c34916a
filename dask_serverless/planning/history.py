"""What a run measured, and the bounded history the next run's predictions learn from.

Workers report per task, inside their batched ``done`` events (see ``events``): the
memory size and cold/warm start of the invocation that ran it, input and output bytes
(``dask.sizeof``), the time spent downloading inputs, executing (wall and CPU time, and
the time it waited for a CPU), the
task's peak memory, and — in a later ``up`` event, because the upload's duration is only
known after the upload — storing the output. Every invocation reports its start-up (a
cold start's boot to ready, plus the hand-over) and when its handler began in an ``inv``
event. A root's input is its literal arguments: the client sizes them
(``literal_bytes``), since no worker downloads them. A task that ran out of memory is
recorded with the size it ran out at.

A task's *function identity* is the dask key prefix (``dask.utils.key_split``) plus the
callable's qualified name: ``"inc:mymodule.inc"``. It is what history is kept by, so
tasks of one kind in different runs (different token, different key) share one series.

After a successful run the client turns the metrics into samples (``run_samples``) and the
history store appends them, bounded per series; ``History`` is the immutable snapshot of
those series a predictor is built from. Nothing here is global: every Scheduler loads its
own snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from statistics import median
from typing import Any, Protocol

from dask.sizeof import sizeof
from dask.utils import key_split

from dask_serverless.graph import DAG

Sample = list[float]
# A run with less CPU time than this says nothing about the machine's capacity.
MIN_CAPACITY_CPU_S = 0.2
# Capacity measured longer ago than this says nothing about the machine now; of the
# rest, the median of the newest few (one run's figure is noisy).
CAPACITY_WINDOW_S = 300.0
# What a CFS quota below one CPU delivers of its share on an idle machine, at least (it is
# throttled in slices).
QUOTA_EFFICIENCY = 0.8
CAPACITY_RUNS = 3


class CpuShare(Protocol):
    def share(self, memory_mb: float) -> float: ...


@dataclass(frozen=True)
class TaskMetrics:
    """One task as a worker measured it; times in seconds, ``start`` in Unix seconds."""

    index: int
    worker_id: str
    start: float
    memory_mb: int | None
    cold: bool
    input_bytes: int
    output_bytes: int
    download_s: float
    exec_s: float
    downloaded_bytes: int
    upload_s: float = 0.0
    cpu_s: float | None = None
    peak_mb: float = 0.0
    wait_s: float = 0.0
    invocation_id: str = ""

    @property
    def total_s(self) -> float:
        return self.download_s + self.exec_s + self.upload_s


@dataclass(frozen=True)
class InvocationMetrics:
    worker_id: str
    memory_mb: int | None
    cold: bool
    startup_s: float
    invocation_id: str = ""
    start: float = 0.0


def measured_tasks(
    task_events: Iterable[Sequence[Any]], uploads: Mapping[int, float]
) -> dict[int, TaskMetrics]:
    """The metrics of every task a run's ``done`` events measured, by node."""
    measured: dict[int, TaskMetrics] = {}
    for event in task_events:
        metrics = task_metrics(event, uploads.get(int(event[1]), 0.0))
        if metrics is not None:
            measured[metrics.index] = metrics
    return measured


def task_metrics(done: Sequence[Any], upload_s: float = 0.0) -> TaskMetrics | None:
    """The metrics in a ``done`` event, or None for an event without them."""
    if len(done) < 12:
        return None
    _kind, index, worker_id, start, _duration, memory, cold, nin, nout, down, run, read = done[:12]
    extra = list(done[12:16]) + [None] * (16 - max(12, len(done)))
    return TaskMetrics(
        index=int(index),
        worker_id=str(worker_id),
        start=float(start),
        memory_mb=int(memory) if memory else None,
        cold=bool(cold),
        input_bytes=int(nin),
        output_bytes=int(nout),
        download_s=float(down),
        exec_s=float(run),
        downloaded_bytes=int(read),
        upload_s=float(upload_s),
        cpu_s=None if extra[0] is None else float(extra[0]),
        peak_mb=float(extra[1] or 0.0),
        wait_s=float(extra[2] or 0.0),
        invocation_id=str(extra[3] or ""),
    )


def invocation_metrics(event: Sequence[Any]) -> InvocationMetrics:
    _kind, worker_id, memory, cold, startup = event[:5]
    invocation_id, start = (list(event[5:7]) + ["", 0.0])[:2]
    return InvocationMetrics(
        str(worker_id),
        int(memory) if memory else None,
        bool(cold),
        float(startup),
        str(invocation_id),
        float(start),
    )


def literal_bytes(dag: DAG) -> list[int]:
    """Bytes of every root's literal arguments (``dask.sizeof``); 0 for other nodes.

    A root downloads nothing, so without this every ``sort(gen(n))`` would look the same
    whatever ``n``.
    """
    sizes = [0] * len(dag)
    for index in dag.roots:
        node = dag.nodes[index]
        args = getattr(node, "args", None)
        if node is None or args is None:
            continue
        try:
            sizes[index] = int(sizeof(list(args))) + int(sizeof(dict(getattr(node, "kwargs", {}))))
        except Exception:
            sizes[index] = 0
    return sizes


def callable_name(func: Any) -> str:
    """``module.qualname`` of a callable, looking through ``functools.partial``."""
    while hasattr(func, "func") and not hasattr(func, "__qualname__"):
        func = func.func
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    module = getattr(func, "__module__", None) or type(func).__module__
    return f"{module}.{qualname}"


def function_identity(key: Any, node: Any) -> str:
    """``key_split(key)`` plus what the node calls: ``"inc:tests.tasks.inc"``."""
    if node is None:
        return ""
    func = getattr(node, "func", None)
    what = callable_name(func) if func is not None else type(node).__name__.lower()
    return f"{key_split(key)}:{what}"


def function_identities(dag: DAG) -> list[str]:
    """The function identity of every node; ``""`` for the sink."""
    return [function_identity(key, node) for key, node in zip(dag.keys, dag.nodes, strict=True)]


@dataclass(frozen=True)
class History:
    """Samples of past runs: per (function, MB), per MB for transfers and start-ups.

    ``tasks[(function, MB)]`` holds ``[input_bytes, output_bytes, exec_s, cpu_s,
    peak_mb, wait_s]`` samples (``wait_s``: waiting for a CPU), ``transfers[MB]``
    ``[bytes, seconds]``, ``startups[MB]`` ``[cold, seconds, setup_s, CPUs the run got]``
    (the last two where measured) and
    ``out_of_memory[function]`` the sizes it ran out of memory at, ``residuals[function]``
    its recent tasks' measured / planned busy time (before calibration), ``capacity``
    ``[unix time, CPUs]`` of recent runs on a shared machine, newest first
    (``cpu_capacity``).
    """

    tasks: Mapping[tuple[str, int], Sequence[Sample]] = field(default_factory=dict)
    transfers: Mapping[int, Sequence[Sample]] = field(default_factory=dict)
    startups: Mapping[int, Sequence[Sample]] = field(default_factory=dict)
    out_of_memory: Mapping[str, Sequence[int]] = field(default_factory=dict)
    residuals: Mapping[str, Sequence[float]] = field(default_factory=dict)
    capacity: Sequence[Sample] = ()

    def knows(self, function: str) -> bool:
        return any(f == function for f, _m in self.tasks)


def run_samples(
    functions: Sequence[str],
    tasks: Iterable[TaskMetrics],
    invocations: Iterable[InvocationMetrics],
    literals: Sequence[int] | None = None,
    first_starts: Mapping[str, float] | None = None,
    capacity: float | None = None,
) -> tuple[dict[tuple[str, int], list[Sample]], dict[int, list[Sample]], dict[int, list[Sample]]]:
    """A finished run's metrics as history samples: ``(tasks, transfers, startups)``.

    ``first_starts`` (``first_task_starts``) gives a start-up sample its setup: from the
    handler's start to the invocation's first task; ``capacity`` (``cpu_capacity``), the
    CPUs the run got on a shared machine, goes with it: the setup is CPU work, and its
    time says how much only together with the CPU it could get.
    """
    by_function: dict[tuple[str, int], list[Sample]] = {}
    transfers: dict[int, list[Sample]] = {}
    startups: dict[int, list[Sample]] = {}
    for task in tasks:
        function = functions[task.index]
        if not function or task.memory_mb is None:
            continue
        literal = literals[task.index] if literals is not None else 0
        cpu_s = task.exec_s if task.cpu_s is None else task.cpu_s
        by_function.setdefault((function, task.memory_mb), []).append(
            [
                task.input_bytes + literal,
                task.output_bytes,
                round(task.exec_s, 6),
                round(cpu_s, 6),
                round(task.peak_mb, 1),
                round(task.wait_s, 6),
            ]
        )
        if task.downloaded_bytes > 0:
            transfers.setdefault(task.memory_mb, []).append(
                [task.downloaded_bytes, round(task.download_s, 6)]
            )
        if task.upload_s > 0:
            transfers.setdefault(task.memory_mb, []).append(
                [task.output_bytes, round(task.upload_s, 6)]
            )
    for invocation in invocations:
        if invocation.memory_mb is None:
            continue
        sample = [int(invocation.cold), round(invocation.startup_s, 6)]
        first = (first_starts or {}).get(invocation.invocation_id)
        if first is not None and invocation.start > 0:
            sample.append(round(max(0.0, first - invocation.start), 6))
            if capacity is not None:
                sample.append(round(capacity, 4))
        startups.setdefault(invocation.memory_mb, []).append(sample)
    return by_function, transfers, startups


def first_task_starts(tasks: Iterable[TaskMetrics]) -> dict[str, float]:
    """When each invocation's first task began (Unix seconds), by invocation id."""
    first: dict[str, float] = {}
    for task in tasks:
        if task.invocation_id:
            first[task.invocation_id] = min(first.get(task.invocation_id, task.start), task.start)
    return first


def cpu_capacity(tasks: Iterable[TaskMetrics], cores: float, cpu: CpuShare) -> float | None:
    """The CPUs a run's instances got of the ``cores`` they share; None: too little CPU
    work to tell.

    On the local backend every instance of a backend sits in one cgroup, and the kernel
    shares the machine between that group and everything else running on it (other
    programs, other backends): on a busy machine the run gets fewer than ``cores`` CPUs
    however many instances it starts. Each task measured its CPU time and the time it was
    runnable but waiting (``wait_s``); so, while it executed, it asked for
    ``min(runnable / exec, 1)`` of a CPU at most its instance's share (several CPUs for a
    task running more threads). Summing those over the tasks executing at once gives the
    demand at every moment; the capacity is the ``c`` at which ``min(c, demand)``,
    integrated over the run, equals the CPU time the tasks got. A task held by a share
    below one CPU asks for ``QUOTA_EFFICIENCY`` of its share: getting that much, it was
    held by its quota, not by the machine.
    """
    changes: list[tuple[float, float]] = []
    received = 0.0
    shares: dict[int | None, float] = {}
    for task in tasks:
        if task.cpu_s is None or task.exec_s <= 0 or task.cpu_s <= 0:
            continue
        runnable = (task.cpu_s + task.wait_s) / task.exec_s
        share = shares.get(task.memory_mb)
        if share is None:
            share = cores if task.memory_mb is None else cpu.share(task.memory_mb)
            if share < 1.0:
                # A quota below one CPU gives a little less than its share on an idle machine.
                share *= QUOTA_EFFICIENCY
            shares[task.memory_mb] = share
        demand = min(share, max(1.0, runnable)) * min(1.0, runnable)
        received += task.cpu_s
        begin = task.start + task.download_s
        changes.append((begin, demand))
        changes.append((begin + task.exec_s, -demand))
    if received < MIN_CAPACITY_CPU_S:
        return None
    changes.sort()
    spans: list[tuple[float, float]] = []
    level, last = 0.0, changes[0][0]
    for at, delta in changes:
        if at > last and level > 1e-9:
            spans.append((at - last, level))
        level, last = level + delta, at

    # The CPU time a capacity ``c`` gives, sum(length * min(c, demand)), is piecewise
    # linear in ``c``: solved exactly over the spans sorted by demand (linear after the
    # sort; a bisection re-summing every span costs 40 passes over a 200 000-task run).
    if sum(length * min(cores, demand) for length, demand in spans) <= received:
        return cores
    spans.sort(key=itemgetter(1))
    below, above = 0.0, sum(length for length, _demand in spans)
    for length, demand in spans:
        if below + demand * above >= received:
            return (received - below) / above
        below += length * demand
        above -= length
    return cores


def recent_capacity(samples: Sequence[Sample], now: float) -> float | None:
    """The CPUs the next run can expect: the median of the newest ``CAPACITY_RUNS``
    capacities measured within ``CAPACITY_WINDOW_S`` (newest first); None without any."""
    recent = [float(s[1]) for s in samples if now - float(s[0]) <= CAPACITY_WINDOW_S]
    if not recent:
        return None
    return float(median(recent[:CAPACITY_RUNS]))
