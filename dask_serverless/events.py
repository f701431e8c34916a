"""Event records the workers stream to the client, and the client's consumer of them.

Workers batch events (a chain of tiny tasks must not pay a Redis round trip per task for
progress reporting) and append each batch as one stream entry. An event is a short JSON
array:

* ``["done", index, worker_id, start_unix_s, duration_s, *metrics]`` — a task finished;
  ``metrics`` (for the planner's history, see ``planning.history``) are memory MB, cold
  start 0/1, input bytes, output bytes, download s, execution s, downloaded bytes, CPU s
  of the execution, peak memory MB, seconds it waited for a CPU (run delay), and the id
  of the invocation that ran it;
* ``["up", index, upload_s]`` — a task's output was stored (sent in a later batch);
* ``["inv", worker_id, memory_mb, cold, startup_s, invocation_id, start_unix_s]`` — an
  invocation started (``startup_s``: a cold start's boot to ready plus the hand-over);
* ``["retry", index, attempt, error_repr]`` — a task raised and is being retried;
* ``["error", index]`` — a task failed; the signed exception is in the run's error key;
* ``["oom", index, memory_mb]`` — the platform killed the instance running a task for
  exceeding its configuration; the client retries it one size up;
* ``["finished"]`` — the sink ran: the result is stored and intermediates are deleted.

``RunProgress`` replays them into the ``state`` dictionary dask's callbacks expect
(``waiting``/``ready``/``running``/``finished``), so ``dask.diagnostics.ProgressBar`` and
any ``dask.callbacks.Callback`` move as remote tasks finish. Tasks run remotely, so
``pretask`` fires when the client learns the task ran, just before ``posttask``, and
``posttask`` gets ``None`` as the result: the value never travels to the client.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dask_serverless.graph import DAG

DONE = "done"
RETRY = "retry"
ERROR = "error"
FINISHED = "finished"
UPLOAD = "up"
INVOCATION = "inv"
OUT_OF_MEMORY = "oom"

Event = list


def encode(events: Sequence[Event]) -> bytes:
    return json.dumps(events, separators=(",", ":")).encode()


def decode(batch: bytes) -> list[Event]:
    return json.loads(batch)


def done(
    index: int, worker_id: str, start: float, duration: float, metrics: Sequence[Any] = ()
) -> Event:
    return [DONE, index, worker_id, round(start, 6), round(duration, 6), *metrics]


def retry(index: int, attempt: int, error_repr: str) -> Event:
    return [RETRY, index, attempt, error_repr]


def error(index: int) -> Event:
    return [ERROR, index]


def finished() -> Event:
    return [FINISHED]


def out_of_memory(index: int, memory_mb: int) -> Event:
    return [OUT_OF_MEMORY, index, int(memory_mb)]


def upload(index: int, seconds: float) -> Event:
    return [UPLOAD, index, round(seconds, 6)]


def invocation_started(
    worker_id: str,
    memory_mb: int | None,
    cold: bool,
    startup_s: float,
    invocation_id: str = "",
    start: float = 0.0,
) -> Event:
    return [
        INVOCATION,
        worker_id,
        memory_mb or 0,
        int(cold),
        round(startup_s, 6),
        invocation_id,
        round(start, 6),
    ]


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
    }


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

    def apply(self, events: Iterable[Event]) -> None:
        for event in events:
            kind = event[0]
            if kind == DONE:
                self._task_done(event)
            elif kind == RETRY:
                index = int(event[1])
                self.retries[index] = max(self.retries.get(index, 0), int(event[2]))
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

    def _task_done(self, event: Event) -> None:
        index = int(event[1])
        if index in self.seen:
            return
        self.seen.add(index)
        self.task_events.append(event)
        if not self.callbacks:
            return
        key = self.dag.keys[index]
        state = self.state
        state["waiting"].discard(key)
        state["ready"].discard(key)
        state["running"].add(key)
        for callback in self.callbacks:
            if callback[2]:
                callback[2](key, self.graph, state)
        state["running"].discard(key)
        state["finished"].add(key)
        for callback in self.callbacks:
            if callback[3]:
                callback[3](key, None, self.graph, state, event[2])
