"""Past runs and what the planner learned from them, as text for the command line.

``dask-serverless runs`` lists the newest runs of the run history (``protocol.runs``),
``report RUN-ID`` prints or draws one of them, and ``history FUNCTION`` shows what the
planner knows about a function: its samples per memory size (``protocol.history``), the
line it fits through them (``planning.predict``), and how far its predictions were off in
the recent runs that ran it. Everything is read from Redis with a bounded number of
round trips; nothing here writes.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from dask_serverless.planning.history import History
from dask_serverless.planning.predict import Predictor
from dask_serverless.planning.sla import SLA
from dask_serverless.protocol.history import HistoryStore
from dask_serverless.protocol.runs import RunHistory
from dask_serverless.report import RunReport, format_table

# Recent runs ``history FUNCTION`` searches for the function's prediction errors.
ERROR_RUNS = 20


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s))


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def recent_summaries(history: RunHistory, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` runs' summaries, newest first (runs without one left out)."""
    recent = history.recent(count)
    found = history.summaries([run_id for run_id, _ in recent])
    return [json.loads(text) for text in found if text is not None]


def runs_table(summaries: Sequence[dict[str, Any]]) -> str:
    """What ``dask-serverless runs`` prints."""
    if not summaries:
        return "No runs in the run history."
    rows = [
        [
            _when(s.get("started")),
            s["run_id"],
            str(s.get("tasks", "-")),
            str(s.get("planner", "-")),
            str(s.get("sla", "-")),
            _number(s.get("predicted_makespan_s")),
            _number(s.get("actual_makespan_s")),
            _number(s.get("cost_gb_s"), 4),
            str(s.get("status", "-")),
        ]
        for s in summaries
    ]
    header = ["started", "run", "tasks", "planner", "SLA", "pred s", "act s", "GB-s", "status"]
    return format_table(header, rows, None)


def makespans(summaries: Sequence[dict[str, Any]]) -> list[Any]:
    """Recent runs as points of a report's makespan scatter (``plot.Makespan``)."""
    from dask_serverless.plot import Makespan

    return [
        Makespan(
            s["run_id"],
            float(s.get("predicted_makespan_s") or 0.0),
            float(s.get("actual_makespan_s") or 0.0),
            str(s.get("status")),
        )
        for s in summaries
    ]


def find_report(history: RunHistory, run_id: str, search: int) -> RunReport | None:
    """The report of ``run_id`` or of the one recent run whose id starts with it."""
    (exact,) = history.load([run_id])
    if exact is not None:
        return RunReport.from_json(exact)
    matches = [r for r, _ in history.recent(search) if r.startswith(run_id)]
    if len(matches) != 1:
        return None
    (found,) = history.load(matches)
    return None if found is None else RunReport.from_json(found)


def matching_functions(summaries: Sequence[dict[str, Any]], name: str) -> list[str]:
    """Function identities of recent runs named ``name`` in full or by key prefix."""
    seen = {f for s in summaries for f in s.get("functions", ())}
    return sorted(f for f in seen if f == name or f.split(":", 1)[0] == name)


def function_history(
    samples: HistoryStore,
    runs: RunHistory,
    function: str,
    memory_sizes: Sequence[int],
    sla: str,
) -> str:
    """What ``dask-serverless history FUNCTION`` prints."""
    summaries = recent_summaries(runs, runs.keep)
    identities = matching_functions(summaries, function) or [function]
    sections = []
    for identity in identities:
        loaded = samples.load([identity], memory_sizes)
        predictor = Predictor(History(*loaded), SLA.parse(sla))
        sections.append(_samples_section(identity, loaded[0], predictor, memory_sizes))
        sections.append(_errors_section(identity, summaries, runs))
    return "\n\n".join(sections)


def _samples_section(
    identity: str,
    tasks: dict[tuple[str, int], list[list[float]]],
    predictor: Predictor,
    memory_sizes: Sequence[int],
) -> str:
    """Samples per size, then the fitted model and its prediction at every size."""
    if not tasks:
        return f"{identity}: no samples in the history."
    rows = []
    for (_f, memory), series in sorted(tasks.items(), key=lambda item: item[0][1]):
        times = [s[2] for s in series]
        inputs = [s[0] for s in series]
        rows.append(
            [
                str(memory),
                str(len(series)),
                f"{statistics.fmean(times):.4f}",
                f"{max(times):.4f}",
                f"{min(inputs):.0f}–{max(inputs):.0f}",
            ]
        )
    header = ["MB", "samples", "mean s", "max s", "input bytes"]
    lines = [f"{identity}: samples per memory size", format_table(header, rows, None)]
    model = predictor.model(identity)
    if model is not None:
        typical = statistics.median(s[0] for series in tasks.values() for s in series)
        lines.append(
            f"fit: I/O {model.io.intercept:.4f} s + {model.io.slope * 1e6:.4f} s/MB of input, "
            f"CPU {model.cpu.intercept:.4f} s + {model.cpu.slope * 1e6:.4f} s/MB at one "
            f"vCPU, {model.threads:g} thread(s); calibration ×{predictor.bias(identity):.2f}"
        )
        predicted = ", ".join(
            f"{m} MB {predictor.exec_time(identity, typical, m):.4f} s" for m in memory_sizes
        )
        lines.append(f"predicted at the median input ({typical:.0f} bytes): {predicted}")
    return "\n".join(lines)


def _errors_section(identity: str, summaries: Sequence[dict[str, Any]], runs: RunHistory) -> str:
    ran = [s for s in summaries if identity in s.get("functions", ())][:ERROR_RUNS]
    reports = [RunReport.from_json(j) for j in runs.load([s["run_id"] for s in ran]) if j]
    rows = []
    for report in reversed(reports):
        measured = [
            t for t in report.tasks if t.function == identity and t.actual_s and t.actual_s > 0
        ]
        errors = [t.error for t in measured if t.error is not None]
        if not errors:
            continue
        rows.append(
            [
                _when(report.started_unix),
                report.run_id,
                str(len(measured)),
                f"{statistics.fmean(t.predicted_s for t in measured):.4f}",
                f"{statistics.fmean(t.actual_s or 0.0 for t in measured):.4f}",
                f"{statistics.median(errors):+.0%}",
            ]
        )
    if not rows:
        return f"{identity}: no measured tasks in the recent runs."
    header = ["started", "run", "tasks", "pred s", "act s", "median error"]
    return f"{identity}: prediction error over time (oldest first)\n" + format_table(
        header, rows, None
    )
