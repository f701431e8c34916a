"""Planned next to actual: what a run was predicted to do and what it did (I-7).

After every run the Scheduler keeps a ``RunReport`` as ``sched.last_run``. Per task it
holds the configuration, the predicted and the measured busy time (download, execution,
upload), the predicted and the measured start and finish (seconds since the client
invoked the roots) and whether the task was on the plan's critical path; for the run the
planner, the predicted and actual makespan and cost.

Cost is billed memory-time in GB-seconds (MB / 1024 × seconds), measured the way the plan
predicts it: each task's busy time at its configuration plus every invocation's start-up.
Printing a report gives a table; ``tasks`` is a plain list of ``TaskRecord``.

A run that failed, timed out or was cancelled has a report too (``status`` says which,
``error`` says why; tasks that never ran have no actual times). ``to_frame()`` gives one
pandas row per task, ``to_json()``/``from_json()`` round-trip a report (this is how run
history keeps it), and ``plot()``/``to_html()`` draw it (see ``dask_serverless.plot``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from bokeh.model import Model

_TABLE_ROWS = 200


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], limit: int | None) -> str:
    """A plain-text table, right-aligned but for the first column; at most ``limit`` rows."""
    shown = list(rows if limit is None else rows[:limit])
    widths = [len(h) for h in header]
    for row in shown:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in shown]
    if len(shown) < len(rows):
        lines.append(f"… {len(rows) - len(shown)} more tasks")
    return "\n".join(lines)


@dataclass(frozen=True)
class TaskRecord:
    """One task, planned and actual. Times in seconds; starts relative to the run's start."""

    key: Any
    memory_mb: int | None
    predicted_s: float
    actual_s: float | None
    on_critical_path: bool
    predicted_start_s: float
    predicted_finish_s: float
    actual_start_s: float | None = None
    actual_finish_s: float | None = None
    worker_id: str | None = None
    cold: bool | None = None
    function: str = ""
    input_bytes: int | None = None
    output_bytes: int | None = None
    retries: int = 0
    state: str = "done"
    dependencies: tuple[int, ...] = ()

    @property
    def error(self) -> float | None:
        """Relative error of the predicted busy time; None when it was not measured."""
        if self.actual_s is None or self.actual_s <= 0:
            return None
        return (self.predicted_s - self.actual_s) / self.actual_s

    @property
    def cost_gb_s(self) -> float:
        """What this task's busy time was billed (start-ups are counted per invocation)."""
        return 0.0 if self.actual_s is None else billed_gb_s([(self.memory_mb, self.actual_s)])


@dataclass(frozen=True)
class InvocationRecord:
    """One invocation's start: the instance that served it, its size, cold or warm."""

    worker_id: str
    memory_mb: int | None
    cold: bool
    startup_s: float


# Run states of a report; a run in progress is ``RUNNING`` (the live dashboard's view).
RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED = (
    "running",
    "succeeded",
    "failed",
    "timed out",
    "cancelled",
)
_JSON_VERSION = 1


@dataclass(frozen=True)
class RunReport:
    """``sched.last_run``: the plan of a run next to what was measured."""

    run_id: str
    planner: str
    sla: str
    tasks: list[TaskRecord]
    predicted_makespan_s: float
    actual_makespan_s: float
    predicted_cost_gb_s: float
    cost_gb_s: float
    invocations: int = 0
    cold_starts: int = 0
    throttled: bool | None = None
    target_s: float | None = None
    notes: tuple[str, ...] = field(default=())
    status: str = SUCCEEDED
    error: str | None = None
    started_unix: float | None = None
    invocation_records: tuple[InvocationRecord, ...] = field(default=(), repr=False)

    def summary(self) -> str:
        details = [f"SLA {self.sla}"]
        if self.target_s is not None:
            details.append(f"target {self.target_s:.3f} s")
        if self.throttled is False:
            details.append("unthrottled")
        lines = [
            f"Run {self.run_id} by {self.planner} ({', '.join(details)})"
            + ("" if self.status == SUCCEEDED else f": {self.status.upper()}"),
            f"  makespan: predicted {self.predicted_makespan_s:.3f} s, "
            f"actual {self.actual_makespan_s:.3f} s",
            f"  cost: predicted {self.predicted_cost_gb_s:.3f} GB-s, "
            f"actual {self.cost_gb_s:.3f} GB-s",
            f"  invocations: {self.invocations} ({self.cold_starts} cold)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)

    def table(self, limit: int | None = _TABLE_ROWS) -> str:
        rows = [
            [
                str(t.key),
                "" if t.memory_mb is None else str(t.memory_mb),
                _seconds(t.predicted_start_s),
                _seconds(t.actual_start_s),
                _seconds(t.predicted_s),
                _seconds(t.actual_s),
                "*" if t.on_critical_path else "",
            ]
            for t in self.tasks
        ]
        header = ["task", "MB", "pred start", "act start", "pred s", "act s", "critical"]
        return format_table(header, rows, limit)

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.table()}"

    # -- data out ----------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """One row per task: planned next to actual, instance, bytes, cost, retries."""
        import pandas as pd

        rows = {
            "key": [t.key for t in self.tasks],
            "function": [t.function for t in self.tasks],
            "state": [t.state for t in self.tasks],
            "memory_mb": [t.memory_mb for t in self.tasks],
            "planned_start_s": [t.predicted_start_s for t in self.tasks],
            "planned_finish_s": [t.predicted_finish_s for t in self.tasks],
            "actual_start_s": [t.actual_start_s for t in self.tasks],
            "actual_finish_s": [t.actual_finish_s for t in self.tasks],
            "predicted_s": [t.predicted_s for t in self.tasks],
            "actual_s": [t.actual_s for t in self.tasks],
            "cold": [t.cold for t in self.tasks],
            "instance": [t.worker_id for t in self.tasks],
            "input_bytes": [t.input_bytes for t in self.tasks],
            "output_bytes": [t.output_bytes for t in self.tasks],
            "cost_gb_s": [t.cost_gb_s for t in self.tasks],
            "retries": [t.retries for t in self.tasks],
            "critical_path": [t.on_critical_path for t in self.tasks],
        }
        frame = pd.DataFrame(rows)
        for column in ("memory_mb", "input_bytes", "output_bytes"):
            frame[column] = frame[column].astype("Int64")
        frame["cold"] = frame["cold"].astype("boolean")
        return frame

    def to_json(self) -> str:
        """The whole report as JSON, tasks stored column by column; see ``from_json``."""
        run = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("tasks", "invocation_records")
        }
        run["notes"] = list(self.notes)
        columns = {f.name: [getattr(t, f.name) for t in self.tasks] for f in fields(TaskRecord)}
        columns["dependencies"] = [list(d) for d in columns["dependencies"]]
        invocations = [
            [i.worker_id, i.memory_mb, int(i.cold), i.startup_s] for i in self.invocation_records
        ]
        document = {
            "version": _JSON_VERSION,
            "run": run,
            "tasks": columns,
            "invocations": invocations,
        }
        return json.dumps(document, separators=(",", ":"), default=_json_default)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunReport:
        """The report ``to_json`` wrote; dask keys come back as str, int or tuples."""
        document = json.loads(text)
        if document.get("version") != _JSON_VERSION:
            raise ValueError(f"unsupported run report version {document.get('version')!r}")
        columns = document["tasks"]
        names = [f.name for f in fields(TaskRecord) if f.name in columns]
        count = len(columns["key"])
        tasks = []
        for row in range(count):
            values = {name: columns[name][row] for name in names}
            values["key"] = _dask_key(values["key"])
            values["dependencies"] = tuple(values.get("dependencies") or ())
            tasks.append(TaskRecord(**values))
        run = dict(document["run"])
        run["notes"] = tuple(run.get("notes") or ())
        known = {f.name for f in fields(cls)}
        invocations = tuple(
            InvocationRecord(str(w), m, bool(c), float(s)) for w, m, c, s in document["invocations"]
        )
        return cls(
            tasks=tasks,
            invocation_records=invocations,
            **{k: v for k, v in run.items() if k in known},
        )

    def plot(self) -> Model:
        """A bokeh layout: Gantt per instance, cost split, predicted vs actual."""
        from dask_serverless.plot import report_layout

        return report_layout(self)

    def to_html(self, filename: str, others: Sequence[Any] = ()) -> str:
        """Write a standalone, offline HTML page of ``plot()``; returns its path.

        ``others`` (``plot.Makespan`` points of other runs) join the makespan scatter.
        """
        from dask_serverless.plot import save_reports

        return save_reports([self], filename, others)


def _json_default(value: Any) -> Any:
    """Dask keys and numpy scalars in JSON: tuples become lists, the rest their value."""
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _dask_key(value: Any) -> Any:
    """A dask key decoded from JSON: lists (JSON's tuples) back to tuples, iteratively."""
    if not isinstance(value, list):
        return value
    # Rebuild innermost lists first, so no recursion over nested keys is needed.
    stack: list[tuple[list, list]] = [(value, [])]
    result: Any = None
    while stack:
        source, built = stack[-1]
        if len(built) < len(source):
            item = source[len(built)]
            if isinstance(item, list):
                stack.append((item, []))
            else:
                built.append(item)
            continue
        stack.pop()
        result = tuple(built)
        if stack:
            stack[-1][1].append(result)
    return result


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def billed_gb_s(items: Iterable[tuple[int | None, float]]) -> float:
    """GB-seconds of ``(memory MB, seconds)`` items (unknown memory counts as nothing)."""
    return sum((memory or 0) / 1024 * seconds for memory, seconds in items)
