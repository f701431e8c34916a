"""Planned next to actual: what a run was predicted to do and what it did (I-7).

After every run the Scheduler keeps a ``RunReport`` as ``sched.last_run``. Per task it
holds the configuration, the predicted and the measured busy time (download, execution,
upload), the predicted and the measured start and finish (seconds since the client
invoked the roots) and whether the task was on the plan's critical path; for the run the
planner, the predicted and actual makespan and cost.

Cost is AWS Lambda's bill, computed by one formula (``Pricing.bill``) for the plan's
prediction and for the report: every invocation's duration — its handler's run, plus the
initialisation of a cold start — rounded up to 1 ms, times its configuration in GB, gives
GB-seconds; those times the price per GB-second of the architecture, plus the fee per
request, give dollars. Prices default to AWS's published on-demand prices (us-east-1) and
are configurable (``serverless.planning.pricing``). Printing a report gives a table;
``tasks`` is a plain list of ``TaskRecord``.

A run that failed, timed out or was cancelled has a report too (``status`` says which,
``error`` says why; tasks that never ran have no actual times). ``to_frame()`` gives one
pandas row per task, ``to_json()``/``from_json()`` round-trip a report (this is how run
history keeps it), and ``plot()``/``to_html()`` draw it (see ``dask_serverless.plot``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from dask_serverless.constants import CLIENT_WORKER

if TYPE_CHECKING:
    import pandas as pd
    from bokeh.model import Model

# AWS Lambda on-demand prices, us-east-1 (https://aws.amazon.com/lambda/pricing/):
# USD per GB-second of duration by architecture, and per request.
GB_SECOND_USD = {"x86_64": 0.0000166667, "arm64": 0.0000133334}
REQUEST_USD = 0.20 / 1_000_000
BILLING_GRANULARITY_S = 0.001


@dataclass(frozen=True)
class Bill:
    gb_s: float
    usd: float
    requests: int


@dataclass(frozen=True)
class Pricing:
    """Lambda's prices: per GB-second (by architecture) and per request."""

    architecture: str = "x86_64"
    gb_second_usd: float = GB_SECOND_USD["x86_64"]
    request_usd: float = REQUEST_USD

    @classmethod
    def parse(cls, settings: Pricing | Mapping[str, Any] | None) -> Pricing:
        """From ``{"architecture": "arm64", "gb-second": …, "request": …}`` (all optional)."""
        if isinstance(settings, Pricing):
            return settings
        settings = dict(settings or {})
        architecture = str(settings.get("architecture") or "x86_64")
        if architecture not in GB_SECOND_USD and settings.get("gb-second") is None:
            raise ValueError(
                f"unknown architecture {architecture!r}: use {', '.join(GB_SECOND_USD)} or "
                "give its price per GB-second"
            )
        gb_second = settings.get("gb-second")
        request = settings.get("request")
        return cls(
            architecture,
            float(GB_SECOND_USD[architecture] if gb_second is None else gb_second),
            float(REQUEST_USD if request is None else request),
        )

    def bill(self, invocations: Iterable[tuple[int | None, float]]) -> Bill:
        """The bill of ``(memory MB, billed seconds)`` invocations."""
        gb_s = 0.0
        requests = 0
        for memory, seconds in invocations:
            requests += 1
            billed = math.ceil(max(0.0, seconds) / BILLING_GRANULARITY_S - 1e-9)
            gb_s += (memory or 0) / 1024 * billed * BILLING_GRANULARITY_S
        return Bill(gb_s, gb_s * self.gb_second_usd + requests * self.request_usd, requests)


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
        """This task's share of the bill: its busy time at its configuration (the bill
        itself is per invocation; see ``busy_gb_s``)."""
        return 0.0 if self.actual_s is None else busy_gb_s(self.memory_mb, self.actual_s)


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
    predicted_cost_usd: float = 0.0
    cost_usd: float = 0.0
    predicted_invocations: int = 0
    predicted_cold_starts: int = 0
    predicted_quantile_s: float | None = None
    out_of_memory_retries: int = 0
    status: str = SUCCEEDED
    error: str | None = None
    started_unix: float | None = None
    invocation_records: tuple[InvocationRecord, ...] = field(default=(), repr=False)

    @property
    def client_tasks(self) -> int:
        """Tasks that ran in the client, beside their literal data (``planning.locality``)."""
        return sum(1 for t in self.tasks if (t.worker_id or "").startswith(CLIENT_WORKER))

    def summary(self) -> str:
        details = [f"SLA {self.sla}"]
        if self.target_s is not None:
            details.append(f"target {self.target_s:.3f} s")
        if self.throttled is False:
            details.append("unthrottled")
        quantile = ""
        if self.predicted_quantile_s is not None:
            quantile = f" ({self.sla} {self.predicted_quantile_s:.3f} s)"
        lines = [
            f"Run {self.run_id} by {self.planner} ({', '.join(details)})"
            + ("" if self.status == SUCCEEDED else f": {self.status.upper()}"),
            f"  makespan: predicted {self.predicted_makespan_s:.3f} s{quantile}, "
            f"actual {self.actual_makespan_s:.3f} s",
            f"  cost: predicted {self.predicted_cost_gb_s:.3f} GB-s "
            f"(${self.predicted_cost_usd:.8f}), actual {self.cost_gb_s:.3f} GB-s "
            f"(${self.cost_usd:.8f})",
            f"  invocations: predicted {self.predicted_invocations} "
            f"({self.predicted_cold_starts} cold), actual {self.invocations} "
            f"({self.cold_starts} cold)",
        ]
        if self.client_tasks:
            lines.append(
                f"  in the client: {self.client_tasks} tasks, beside the literal data they "
                "read (instance client:…)"
            )
        if self.out_of_memory_retries:
            lines.append(f"  out-of-memory retries at a larger size: {self.out_of_memory_retries}")
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


def busy_gb_s(memory_mb: int | None, seconds: float) -> float:
    """GB-seconds of ``seconds`` of work at ``memory_mb``, not rounded.

    Lambda bills invocations (``Pricing.bill``), not tasks; this is how a run's bill is
    attributed to its tasks in reports and plots. What the bill has beyond the tasks'
    shares — cold starts' initialisation, rounding, an invocation's time between tasks —
    is shown as the invocations' overhead.
    """
    return (memory_mb or 0) / 1024 * max(0.0, seconds)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
