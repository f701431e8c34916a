"""A run's progress as the client learns it from the event stream, and the dask callbacks
it drives.

``RunProgress`` replays the workers' events (``protocol.events``) into the run's outcome
(finished, the first failing node), its measurements (task metrics, uploads, invocations,
retries) and the ``state`` dictionary dask's callbacks expect
(``waiting``/``ready``/``running``/``finished``), so ``dask.diagnostics.ProgressBar`` and
any ``dask.callbacks.Callback`` move as remote tasks finish. Callbacks are unpacked by
name, as ``dask.local`` does with ``unpack_callbacks``. Tasks run remotely, so ``pretask``
fires when the client learns the task ran, just before ``posttask``, and ``posttask``
gets ``None`` as the result: the value never travels to the client. What the worker
measured travels instead: ``state["task_times"][key]`` is ``(start, finish, worker)`` in
seconds since the epoch, and a ``dask.diagnostics.Profiler`` gets the worker's start and
finish times (on its own clock), so its durations are the tasks' real ones.

Warnings the tasks raised arrive as ``warn`` events; ``emit_warnings`` re-raises each
distinct one once in the client, with its category, message and the task's file and
line, so ``warnings`` filters and ``pytest.warns`` see them as if the task ran here.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from timeit import default_timer
from typing import Any

from dask.callbacks import unpack_callbacks

from dask_serverless.graph import DAG
from dask_serverless.protocol.events import (
    DONE,
    ERROR,
    FINISHED,
    INVOCATION,
    OUT_OF_MEMORY,
    RETRY,
    UPLOAD,
    WARNING,
    Event,
)

logger = logging.getLogger(__name__)

Callbacks = Sequence[tuple[Callable | None, ...]]


def callback_graph(dag: DAG) -> dict:
    """The graph callbacks receive: dask key → task-spec node, without our sink."""
    return {dag.keys[i]: dag.nodes[i] for i in range(dag.sink)}


def initial_state(dag: DAG) -> dict[str, Any]:
    """A dask.local-shaped scheduler state: every task waiting, roots ready."""
    keys = dag.keys[: dag.sink]
    return {
        "dependencies": {k: {dag.keys[d] for d in dag.dependencies[i]} for i, k in enumerate(keys)},
        "dependents": {
            k: {dag.keys[c] for c in dag.dependents[i] if c != dag.sink} for i, k in enumerate(keys)
        },
        "waiting": {k for i, k in enumerate(keys) if dag.dependencies[i]},
        "ready": {k for i, k in enumerate(keys) if not dag.dependencies[i]},
        "running": set(),
        "finished": set(),
        "released": set(),
        "cache": {},
        "waiting_data": {},
        "task_times": {},
    }


def warning_category(name: str) -> type[Warning]:
    """The warning class ``module:qualname`` names; ``UserWarning`` if the client lacks it."""
    module_name, _, qualname = name.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError):
        return UserWarning
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


def profilers_of(callback: Callable | None) -> Any:
    """The ``dask.diagnostics.Profiler`` a ``posttask`` callback belongs to, if any."""
    profile = sys.modules.get("dask.diagnostics.profile")
    owner = getattr(callback, "__self__", None)
    if profile is not None and isinstance(owner, profile.Profiler):
        return owner
    return None


@dataclass
class RunProgress:
    """Folds a run's events into its outcome and drives the dask callbacks."""

    dag: DAG
    callbacks: Callbacks = ()
    graph: dict = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    finished: bool = False
    failed_index: int | None = None
    task_events: list[Event] = field(default_factory=list)
    retries: dict[int, int] = field(default_factory=dict)
    uploads: dict[int, float] = field(default_factory=dict)
    invocations: list[Event] = field(default_factory=list)
    out_of_memory: list[tuple[int, int]] = field(default_factory=list)
    started_callbacks: list[tuple[Callable | None, ...]] = field(default_factory=list)
    warnings: dict[tuple, Event] = field(default_factory=dict)
    # One str object per worker and invocation id: a run's done events repeat them, and
    # JSON decoding makes a new copy for every event the client keeps.
    names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (
            _start,
            self._start_state,
            self._pretask,
            self._posttask,
            self._finish,
        ) = unpack_callbacks(self.callbacks)
        if self.callbacks:
            self.graph = callback_graph(self.dag)
            self.state = initial_state(self.dag)

    @property
    def follows(self) -> bool:
        """Whether anyone watches the run as it goes (then the client follows events)."""
        return bool(self.callbacks)

    def start(self) -> None:
        """Call every ``start`` and ``start_state`` callback, as dask's get does."""
        for callback in self.callbacks:
            if callback[0]:
                callback[0](self.graph)
            self.started_callbacks.append(callback)
        for start_state in self._start_state:
            start_state(self.graph, self.state)

    def finish(self, failed: bool) -> None:
        """Call ``finish`` of every callback whose ``start`` ran."""
        for callback in self.started_callbacks:
            if callback[4]:
                callback[4](self.graph, self.state, failed)

    def apply(self, events: Iterable[Event]) -> None:
        for event in events:
            kind = event[0]
            if kind == DONE:
                self._task_done(event)
            elif kind == RETRY:
                index = int(event[1])
                self.retries[index] = max(self.retries.get(index, 0), int(event[2]))
                logger.info("task %s: retry %s after %s", self.dag.keys[index], event[2], event[3])
            elif kind == ERROR and self.failed_index is None:
                self.failed_index = int(event[1])
            elif kind == FINISHED:
                self.finished = True
            elif kind == UPLOAD:
                self.uploads[int(event[1])] = float(event[2])
            elif kind == INVOCATION:
                self.invocations.append(event)
            elif kind == OUT_OF_MEMORY:
                index = int(event[1])
                self.out_of_memory.append((index, int(event[2])))
                self.retries[index] = self.retries.get(index, 0) + 1
            elif kind == WARNING:
                self.warnings.setdefault(tuple(event[2:]), event)

    def emit_warnings(self) -> None:
        """Re-raise each distinct warning of the run once, as the task raised it."""
        for category, message, filename, lineno in self.warnings:
            warnings.warn_explicit(message, warning_category(category), filename, lineno)
        self.warnings.clear()

    def _task_done(self, event: Event) -> None:
        index = int(event[1])
        if index in self.seen:
            return
        self.seen.add(index)
        for position in (2, -1):
            if isinstance(event[position], str):
                event[position] = self.names.setdefault(event[position], event[position])
        self.task_events.append(event)
        if not self.callbacks:
            return
        key = self.dag.keys[index]
        state = self.state
        state["waiting"].discard(key)
        state["ready"].discard(key)
        state["running"].add(key)
        for pretask in self._pretask:
            pretask(key, self.graph, state)
        state["running"].discard(key)
        state["finished"].add(key)
        start, finish, worker = float(event[3]), float(event[3]) + float(event[4]), event[2]
        state["task_times"][key] = (start, finish, worker)
        # The worker's clock (epoch seconds) on the clock Profiler reads (default_timer).
        offset = default_timer() - time.time()
        for posttask in self._posttask:
            posttask(key, None, self.graph, state, worker)
            profiler = profilers_of(posttask)
            if profiler is not None:
                times = (start + offset, finish + offset, worker)
                profiler._results[key] = (key, self.graph[key], *times)
