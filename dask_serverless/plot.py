"""Drawing a run report with bokeh: a Gantt chart, the cost split, predicted vs actual.

``report_layout(report)`` is what ``RunReport.plot()`` returns:

* a header with the run's outcome, planner, SLA, makespans and cost;
* a **Gantt chart** with one lane per instance (the worker process or Lambda instance that
  ran the tasks): the actual busy time of every task is a bar coloured by its memory
  size, its planned start and finish an outline on the same lane, tasks on the plan's
  critical path are outlined red, and a triangle marks the first task of a cold instance;
  hovering a bar shows the task;
* the **cost** (the bill in GB-s, as ``report.py`` computes it) by function and by memory
  size: tasks' shares, and the invocations' overhead (cold starts, rounding) apart;
* **predicted vs actual**: each task's busy time, and the run's makespan (beside other
  runs' when given: the other runs of a ``performance_report``, or recent runs from the
  run history for ``dask-serverless report --html`` and the dashboard).

Large runs are aggregated so the page stays light (a 10 000-task report opens in a browser
in well under 5 s): above ``MAX_BARS`` tasks, neighbouring bars of one lane with the same
memory size merge into one (``tasks`` counts them in the hover) and the scatter shows at
most ``MAX_POINTS`` tasks, an even sample. Critical-path tasks are always drawn one by one.

``save_reports`` writes one or more reports to one standalone HTML page: each run's
summary as plain HTML (text a browser shows at once, before any script runs), its charts
as bokeh, and bokeh's core JavaScript inline — the page opens offline, no CDN, and needs
no widget bundle.
"""

from __future__ import annotations

import html
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

from bokeh.embed import components
from bokeh.embed.bundle import bundle_for_objs_and_resources
from bokeh.layouts import column, row
from bokeh.model import Model
from bokeh.models import (
    ColumnDataSource,
    FactorRange,
    HoverTool,
    Range1d,
)
from bokeh.models.widgets import Div
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.resources import INLINE

from dask_serverless.report import RunReport, TaskRecord

MAX_BARS = 2000
MAX_POINTS = 2000
# Bars of one lane closer than this share of the makespan merge when aggregating.
_MERGE_GAP_SHARE = 1 / 1500
_LANE_PX = 18
_MIN_GANTT_PX = 160
_MAX_GANTT_PX = 900
_WIDTH_PX = 1100
_NOT_RUN = "(not run)"
_OVERHEAD = "(invocation overhead)"
_CRITICAL_COLOR = "#d62728"


def memory_colors(memories: Sequence[int | None]) -> dict[str, str]:
    """One colour per memory size (as a legend label), smallest size first."""
    sizes = sorted({m for m in memories if m is not None})
    labels = [f"{m} MB" for m in sizes] + (["unknown"] if None in memories else [])
    return {label: Category10_10[i % 10] for i, label in enumerate(labels)}


def _memory_label(memory: int | None) -> str:
    return "unknown" if memory is None else f"{memory} MB"


def _short_function(function: str) -> str:
    """``inc`` of ``inc:tests.tasks.inc``: the key prefix is what users recognise."""
    return function.split(":", 1)[0] or "(sink)"


def header_html(report: RunReport) -> str:
    """The run's summary as HTML: page text, searchable, shown before any script runs."""
    done = sum(1 for t in report.tasks if t.state == "done")
    lines = [
        f"<h2>Run {html.escape(report.run_id)}: {html.escape(report.status)}</h2>",
        f"<p>{len(report.tasks)} tasks, {done} done · planner {html.escape(report.planner)}"
        f" · SLA {html.escape(report.sla)}</p>",
        f"<p>makespan predicted {report.predicted_makespan_s:.3f} s, actual "
        f"{report.actual_makespan_s:.3f} s · cost predicted {report.predicted_cost_gb_s:.3f}"
        f" GB-s (${report.predicted_cost_usd:.8f}), actual {report.cost_gb_s:.3f} GB-s "
        f"(${report.cost_usd:.8f}) · {report.invocations} invocations "
        f"({report.cold_starts} cold)</p>",
    ]
    if len(report.tasks) > MAX_BARS:
        lines.append(
            f"<p>Large run: in the Gantt chart neighbouring bars merged (hover: how many "
            f"tasks); the scatter shows at most {MAX_POINTS} tasks.</p>"
        )
    if report.error:
        lines.append(f"<p><b>error:</b> {html.escape(report.error)}</p>")
    lines += [f"<p>note: {html.escape(note)}</p>" for note in report.notes]
    return "\n".join(lines)


def header(report: RunReport) -> Div:
    """The run's summary as a bokeh element (for pages bokeh serves: the dashboard)."""
    return Div(text=header_html(report), width=_WIDTH_PX)


def _lanes(tasks: Sequence[TaskRecord]) -> list[str]:
    """Instances ordered by their first task's start; tasks that never ran last."""
    first: dict[str, float] = {}
    for t in tasks:
        if t.worker_id is not None and t.actual_start_s is not None:
            first[t.worker_id] = min(first.get(t.worker_id, t.actual_start_s), t.actual_start_s)
    lanes = sorted(first, key=lambda lane: first[lane])
    if any(t.worker_id is None for t in tasks):
        lanes.append(_NOT_RUN)
    return lanes


def _lane_of(task: TaskRecord) -> str:
    return task.worker_id if task.worker_id is not None else _NOT_RUN


def _bars(
    tasks: Sequence[TaskRecord], planned: bool, merge_gap_s: float | None
) -> dict[str, list[Any]]:
    """Gantt bars of ``tasks`` (actual or planned times), merged when ``merge_gap_s``."""
    columns: dict[str, list[Any]] = defaultdict(list)
    by_lane: dict[str, list[tuple[float, float, TaskRecord]]] = defaultdict(list)
    for t in tasks:
        start, finish = (
            (t.predicted_start_s, t.predicted_finish_s)
            if planned
            else (t.actual_start_s, t.actual_finish_s)
        )
        if start is None or finish is None:
            continue
        by_lane[_lane_of(t)].append((start, finish, t))
    for lane, bars in by_lane.items():
        bars.sort(key=lambda bar: bar[0])
        group: list[tuple[float, float, TaskRecord]] = []
        group_end = 0.0
        for bar in bars:
            if (
                group
                and merge_gap_s is not None
                and bar[0] - group_end <= merge_gap_s
                and bar[2].memory_mb == group[0][2].memory_mb
            ):
                group.append(bar)
                group_end = max(group_end, bar[1])
                continue
            if group:
                _add_bar(columns, lane, group)
            group, group_end = [bar], bar[1]
        if group:
            _add_bar(columns, lane, group)
    return columns


def _add_bar(
    columns: dict[str, list[Any]], lane: str, group: Sequence[tuple[float, float, TaskRecord]]
) -> None:
    first = group[0][2]
    columns["lane"].append(lane)
    columns["left"].append(min(b[0] for b in group))
    columns["right"].append(max(b[1] for b in group))
    columns["tasks"].append(len(group))
    columns["key"].append(str(first.key) if len(group) == 1 else f"{len(group)} tasks")
    functions = sorted({_short_function(b[2].function) for b in group})
    columns["function"].append(", ".join(functions[:3]) + (" …" if len(functions) > 3 else ""))
    columns["memory"].append(_memory_label(first.memory_mb))
    columns["predicted"].append(sum(b[2].predicted_s for b in group))
    columns["actual"].append(sum(b[2].actual_s or 0.0 for b in group))
    columns["planned_start"].append(min(b[2].predicted_start_s for b in group))
    columns["cold"].append("cold" if first.cold else "warm" if first.cold is False else "")
    columns["out_bytes"].append(sum(b[2].output_bytes or 0 for b in group))
    columns["retries"].append(sum(b[2].retries for b in group))
    columns["state"].append(first.state if len(group) == 1 else "")


_GANTT_TOOLTIPS = [
    ("task", "@key"),
    ("function", "@function"),
    ("instance", "@lane"),
    ("memory", "@memory (@cold)"),
    ("actual", "@left{0.000} – @right{0.000} s (busy @actual{0.000} s)"),
    ("planned", "start @planned_start{0.000} s, busy @predicted{0.000} s"),
    ("output", "@out_bytes{0,0} bytes"),
    ("retries", "@retries"),
    ("state", "@state"),
]


def gantt(report: RunReport) -> Any:
    """Lanes per instance: actual bars by memory, planned outlines, critical path, cold."""
    tasks = report.tasks
    aggregate = len(tasks) > MAX_BARS
    span = max(report.actual_makespan_s, report.predicted_makespan_s, 1e-3)
    gap = span * _MERGE_GAP_SHARE if aggregate else None
    lanes = _lanes(tasks)
    height = min(_MAX_GANTT_PX, max(_MIN_GANTT_PX, _LANE_PX * len(lanes) + 80))
    title = "Tasks per instance: actual (filled, by memory) and planned (outline)"
    if aggregate:
        title += f" — {len(tasks)} tasks, neighbouring bars merged"
    fig = figure(
        title=title,
        y_range=FactorRange(factors=list(reversed(lanes)) or ["none"]),
        x_range=Range1d(start=0, end=span * 1.02),
        width=_WIDTH_PX,
        height=height,
        x_axis_label="seconds since the run started",
        tools="xpan,xwheel_zoom,box_zoom,reset,save",
        toolbar_location="above",
    )
    colors = memory_colors([t.memory_mb for t in tasks])
    planned = ColumnDataSource(_bars(tasks, planned=True, merge_gap_s=gap))
    fig.hbar(
        y="lane",
        left="left",
        right="right",
        height=0.8,
        source=planned,
        fill_alpha=0,
        line_color="#555555",
        line_dash="dashed",
        legend_label="planned",
    )
    actual = _bars(tasks, planned=False, merge_gap_s=gap)
    bar_renderers: list[Any] = []
    for label, color in colors.items():
        chosen = [i for i, m in enumerate(actual.get("memory", [])) if m == label]
        if not chosen:
            continue
        source = ColumnDataSource(
            {name: [values[i] for i in chosen] for name, values in actual.items()}
        )
        bar_renderers.append(
            fig.hbar(
                y="lane",
                left="left",
                right="right",
                height=0.6,
                source=source,
                fill_color=color,
                line_color=color,
                legend_label=label,
            )
        )
    critical = [t for t in tasks if t.on_critical_path][:MAX_BARS]
    critical_bars = _bars(critical, planned=False, merge_gap_s=None)
    if critical_bars:
        bar_renderers.append(
            fig.hbar(
                y="lane",
                left="left",
                right="right",
                height=0.6,
                source=ColumnDataSource(critical_bars),
                fill_alpha=0,
                line_color=_CRITICAL_COLOR,
                line_width=2,
                legend_label="critical path",
            )
        )
    cold = _cold_starts(tasks)
    if cold["lane"]:
        fig.scatter(
            x="x",
            y="lane",
            source=ColumnDataSource(cold),
            marker="triangle",
            size=10,
            color="black",
            legend_label="cold start",
        )
    fig.add_tools(HoverTool(renderers=bar_renderers, tooltips=_GANTT_TOOLTIPS))
    fig.legend.location = "bottom_right"
    fig.legend.click_policy = "hide"
    fig.yaxis.visible = len(lanes) <= 60
    return fig


def _cold_starts(tasks: Sequence[TaskRecord]) -> dict[str, list[Any]]:
    """The first task of every instance that started cold."""
    first: dict[str, TaskRecord] = {}
    for t in tasks:
        if t.worker_id is None or t.actual_start_s is None:
            continue
        seen = first.get(t.worker_id)
        if seen is None or (seen.actual_start_s or 0.0) > t.actual_start_s:
            first[t.worker_id] = t
    marks = [t for t in first.values() if t.cold]
    return {"lane": [_lane_of(t) for t in marks], "x": [t.actual_start_s for t in marks]}


def cost_split(report: RunReport) -> Any:
    """The run's bill (GB-s, as ``report.py`` computes it) by function and by memory size.

    Tasks get their busy time's share (``TaskRecord.cost_gb_s``); the rest of the bill —
    cold starts, rounding, time between tasks — is the invocations' overhead.
    """
    by_function: dict[str, float] = defaultdict(float)
    by_memory: dict[str, float] = defaultdict(float)
    for t in report.tasks:
        cost = t.cost_gb_s
        by_function[_short_function(t.function)] += cost
        by_memory[_memory_label(t.memory_mb)] += cost
    overhead = report.cost_gb_s - sum(by_function.values())
    if overhead > 0:
        by_function[_OVERHEAD] += overhead
        by_memory[_OVERHEAD] += overhead
    return row(
        _cost_bars("Cost by function (GB-s)", by_function),
        _cost_bars("Cost by memory size (GB-s)", by_memory),
    )


def _cost_bars(title: str, costs: dict[str, float]) -> Any:
    names = sorted(costs, key=lambda n: -costs[n])[:30]
    fig = figure(
        title=title,
        x_range=FactorRange(factors=names or ["none"]),
        width=_WIDTH_PX // 2,
        height=280,
        tools="save",
        toolbar_location=None,
    )
    source = ColumnDataSource({"name": names, "cost": [costs[n] for n in names]})
    fig.vbar(x="name", top="cost", width=0.8, source=source, color=Category10_10[0])
    fig.add_tools(HoverTool(tooltips=[("", "@name"), ("GB-s", "@cost{0.0000}")]))
    fig.xaxis.major_label_orientation = 0.8
    fig.y_range = Range1d(start=0, end=max(costs.values(), default=0.0) * 1.1 or 1.0)
    return fig


class Makespan(NamedTuple):
    """One run's point in the makespan scatter."""

    run_id: str
    predicted_s: float
    actual_s: float
    status: str


def makespan_of(report: RunReport) -> Makespan:
    return Makespan(
        report.run_id, report.predicted_makespan_s, report.actual_makespan_s, report.status
    )


def predicted_vs_actual(report: RunReport, others: Sequence[Makespan] = ()) -> Any:
    """Per task busy time, and per run makespan (this run in red, ``others`` grey):
    predicted on x, actual on y."""
    measured = [t for t in report.tasks if t.actual_s is not None]
    step = max(1, len(measured) // MAX_POINTS)
    sample = measured[::step]
    colors = memory_colors([t.memory_mb for t in report.tasks])
    tasks_fig = _scatter_figure(
        "Task busy time (s)" + (f" — every {step}th of {len(measured)} tasks" if step > 1 else ""),
        [t.predicted_s for t in sample] + [t.actual_s or 0.0 for t in sample],
    )
    source = ColumnDataSource(
        {
            "predicted": [t.predicted_s for t in sample],
            "actual": [t.actual_s for t in sample],
            "key": [str(t.key) for t in sample],
            "color": [colors[_memory_label(t.memory_mb)] for t in sample],
        }
    )
    tasks_fig.scatter("predicted", "actual", source=source, color="color", size=5, alpha=0.6)
    tasks_fig.add_tools(
        HoverTool(tooltips=[("task", "@key"), ("predicted", "@predicted"), ("actual", "@actual")])
    )
    this = makespan_of(report)
    points = [m for m in others if m.actual_s > 0 and m.run_id != this.run_id]
    if this.actual_s > 0:
        points.append(this)
    makespan_fig = _scatter_figure(
        "Makespan (s)" + (f" — this run in red, other runs: {len(points) - 1}" if others else ""),
        [m.predicted_s for m in points] + [m.actual_s for m in points],
    )
    makespan_fig.scatter(
        "predicted",
        "actual",
        source=ColumnDataSource(
            {
                "predicted": [m.predicted_s for m in points],
                "actual": [m.actual_s for m in points],
                "run": [m.run_id for m in points],
                "status": [m.status for m in points],
                "color": [_CRITICAL_COLOR if m is this else "#7f7f7f" for m in points],
            }
        ),
        size=9,
        color="color",
    )
    makespan_fig.add_tools(
        HoverTool(
            tooltips=[
                ("run", "@run (@status)"),
                ("predicted", "@predicted{0.000} s"),
                ("actual", "@actual{0.000} s"),
            ]
        )
    )
    return row(tasks_fig, makespan_fig)


def _scatter_figure(title: str, values: Sequence[float]) -> Any:
    top = max([v for v in values if v is not None] or [1.0]) * 1.1 or 1.0
    fig = figure(
        title=title,
        width=_WIDTH_PX // 2,
        height=320,
        x_range=Range1d(start=0, end=top),
        y_range=Range1d(start=0, end=top),
        x_axis_label="predicted",
        y_axis_label="actual",
        tools="box_zoom,reset,save",
    )
    fig.line([0, top], [0, top], line_dash="dotted", color="gray")
    return fig


def charts(report: RunReport, others: Sequence[Makespan] = ()) -> Model:
    """The charts of one run; ``others`` adds other runs to the makespan scatter."""
    return column(gantt(report), cost_split(report), predicted_vs_actual(report, others))


def report_layout(report: RunReport, others: Sequence[Makespan] = ()) -> Model:
    """The whole report of one run, summary and charts, as one bokeh layout."""
    return column(header(report), charts(report, others))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>body {{ font-family: Helvetica, Arial, sans-serif; font-size: 13px; margin: 12px; }}
section {{ margin-bottom: 32px; }} h2 {{ margin: 8px 0; }} p {{ margin: 2px 0; }}</style>
{resources}
{script}
</head>
<body>
{body}
</body>
</html>
"""


def reports_page(reports: Sequence[RunReport], others: Sequence[Makespan] = ()) -> str:
    """One standalone page: per run its summary (plain HTML) and its charts (bokeh).

    Only bokeh's core bundle is embedded (the summaries are not bokeh widgets), inline,
    so the page opens offline. With several runs a list at the top links to each.
    """
    if not reports:
        return _PAGE.format(
            title="dask-serverless run report",
            resources="",
            script="",
            body="<h2>No dask-serverless run was computed.</h2>",
        )
    makespans = [*others, *(makespan_of(r) for r in reports)]
    layouts = [charts(r, makespans) for r in reports]
    script, divs = components(layouts)
    js, css = bundle_for_objs_and_resources(layouts, INLINE)
    sections = [
        f'<section id="run-{html.escape(r.run_id)}">{header_html(r)}\n{div}</section>'
        for r, div in zip(reports, divs, strict=True)
    ]
    index = ""
    if len(reports) > 1:
        links = "".join(
            f'<li><a href="#run-{html.escape(r.run_id)}">{i + 1}: {html.escape(r.run_id[:8])}'
            f" ({html.escape(r.status)})</a></li>"
            for i, r in enumerate(reports)
        )
        index = f"<h2>{len(reports)} dask-serverless runs</h2><ul>{links}</ul>"
    return _PAGE.format(
        title="dask-serverless run report",
        resources=js + css,
        script=script,
        body=index + "\n".join(sections),
    )


def save_reports(
    reports: Sequence[RunReport], filename: str, others: Sequence[Makespan] = ()
) -> str:
    """Write ``reports`` to ``filename`` as one standalone offline page; returns the path.

    ``others`` are more runs (from the run history) for the makespan scatter.
    """
    path = os.path.abspath(filename)
    with open(path, "w", encoding="utf-8") as file:
        file.write(reports_page(reports, others))
    return path
