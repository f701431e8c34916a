"""Planned next to actual: what a run was predicted to do and what it did (I-7).

After every run the Scheduler keeps a ``RunReport`` as ``sched.last_run``. Per task it
holds the configuration, the predicted and the measured busy time (download, execution,
upload), the predicted and the measured start and finish (seconds since the client
invoked the roots) and whether the task was on the plan's critical path; for the run the
planner, the predicted and actual makespan and cost.

Cost is billed memory-time in GB-seconds (MB / 1024 × seconds), measured the way the plan
predicts it: each task's busy time at its configuration plus every invocation's start-up.
Printing a report gives a table; ``tasks`` is a plain list of ``TaskRecord``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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

    @property
    def error(self) -> float | None:
        """Relative error of the predicted busy time; None when it was not measured."""
        if self.actual_s is None or self.actual_s <= 0:
            return None
        return (self.predicted_s - self.actual_s) / self.actual_s


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

    def summary(self) -> str:
        details = [f"SLA {self.sla}"]
        if self.target_s is not None:
            details.append(f"target {self.target_s:.3f} s")
        if self.throttled is False:
            details.append("unthrottled")
        lines = [
            f"Run {self.run_id} by {self.planner} ({', '.join(details)})",
            f"  makespan: predicted {self.predicted_makespan_s:.3f} s, "
            f"actual {self.actual_makespan_s:.3f} s",
            f"  cost: predicted {self.predicted_cost_gb_s:.3f} GB-s, "
            f"actual {self.cost_gb_s:.3f} GB-s",
            f"  invocations: {self.invocations} ({self.cold_starts} cold)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
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


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def billed_gb_s(items: Iterable[tuple[int | None, float]]) -> float:
    """GB-seconds of ``(memory MB, seconds)`` items (unknown memory counts as nothing)."""
    return sum((memory or 0) / 1024 * seconds for memory, seconds in items)
