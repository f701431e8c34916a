"""The dashboard page: one bokeh document per browser tab, refreshed from a ``RunWatcher``.

The page shows, for the run chosen at the top (until someone picks one there, it follows
the newest run in progress, and stays on it when it ends):

* a status line — state, tasks done of all, failed, cost so far, instances;
* progress per function (done of all);
* the DAG, tasks placed by depth and coloured by state (waiting, ready, done, failed,
  retried), edges drawn up to ``MAX_EDGES``;
* the instances the run's events named, with their size, cold or warm start, tasks run;
* the recent runs of the run history; once the chosen run has ended, its full report
  (``plot.report_layout``) below.

Every ``REFRESH_MS`` the document polls its watcher and replaces its data sources' data;
the layout itself is only rebuilt when another run is chosen or the chosen run ends.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, FactorRange, HoverTool
from bokeh.models.widgets import Div, Select
from bokeh.plotting import figure

from dask_serverless.dashboard.watch import LiveRun, RunWatcher, Snapshot
from dask_serverless.plot import report_layout
from dask_serverless.report import RUNNING, RunReport
from dask_serverless.runs import makespans

REFRESH_MS = 500
MAX_EDGES = 5000
MAX_NODES = 20_000
STATE_COLORS = {
    "waiting": "#c7c7c7",
    "ready": "#ffbf00",
    "done": "#2ca02c",
    "failed": "#d62728",
    "retried": "#ff7f0e",
}
_WIDTH = 1100
_TABLE_STYLE = "border-collapse: collapse; font-size: 13px; text-align: right;"


def dag_layout(report: RunReport) -> tuple[list[int], list[int]]:
    """x: a task's depth (longest path from a root); y: its place among its depth.

    Tasks are numbered in topological order, so one pass in index order is enough.
    """
    depth: list[int] = []
    for task in report.tasks:
        depth.append(1 + max((depth[d] for d in task.dependencies), default=-1))
    placed: Counter[int] = Counter()
    ys = []
    for level in depth:
        ys.append(placed[level])
        placed[level] += 1
    return depth, ys


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain HTML table (escaped): its text is part of the page, as a browser reads it."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<table cellpadding="4" style="{_TABLE_STYLE}"><tr>{head}</tr>{body}</table>'


def instances_table(instances: Sequence[tuple[str, int | None, bool, int, int]]) -> str:
    """Instances as (worker, MB, cold, invocations, tasks) rows."""
    rows = [
        [worker, "-" if memory is None else memory, "cold" if cold else "warm", calls, tasks]
        for worker, memory, cold, calls, tasks in instances
    ]
    return "<h3>Instances</h3>" + html_table(
        ["instance", "MB", "first start", "invocations", "tasks done"], rows
    )


def _function(task: Any) -> str:
    return task.function.split(":", 1)[0] or "(sink)"


class DashboardPage:
    """The widgets of one browser tab and how a poll updates them."""

    def __init__(self, watcher: RunWatcher) -> None:
        self.watcher = watcher
        self.chosen: str | None = None
        self.summaries: list[dict[str, Any]] = []
        self.picked = False
        self._choosing = False
        self.shown_ended: str | None = None
        self._layout_of: str | None = None
        self.status = Div(text="<h2>dask-serverless</h2><p>No runs yet.</p>", width=_WIDTH)
        self.select = Select(title="Run", options=[], width=_WIDTH // 2)
        self.select.on_change("value", self._choose)
        self.progress_source = ColumnDataSource({"function": [], "done": [], "total": []})
        self.progress_range = FactorRange(factors=["none"])
        self.progress = figure(
            title="Progress per function (done of all tasks)",
            y_range=self.progress_range,
            width=_WIDTH // 2,
            height=220,
            tools="",
            toolbar_location=None,
        )
        self.progress.hbar(
            y="function",
            right="total",
            height=0.7,
            source=self.progress_source,
            color=STATE_COLORS["waiting"],
        )
        self.progress.hbar(
            y="function",
            right="done",
            height=0.7,
            source=self.progress_source,
            color=STATE_COLORS["done"],
        )
        self.progress.add_tools(HoverTool(tooltips=[("", "@function: @done of @total")]))
        self.nodes = ColumnDataSource({"x": [], "y": [], "color": [], "key": [], "state": []})
        self.edges = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": []})
        self.dag = figure(
            title="DAG: tasks by depth, coloured by state",
            width=_WIDTH,
            height=360,
            tools="pan,wheel_zoom,box_zoom,reset",
            x_axis_label="depth",
        )
        self.dag.segment("x0", "y0", "x1", "y1", source=self.edges, color="#999999", alpha=0.4)
        self.dag.scatter("x", "y", color="color", size=8, source=self.nodes)
        self.dag.add_tools(HoverTool(tooltips=[("task", "@key"), ("state", "@state")]))
        self.dag.yaxis.visible = False
        self.instances = Div(text="", width=_WIDTH // 2)
        self.runs = Div(text="", width=_WIDTH)
        self.report_area = column(Div(text=""), width=_WIDTH)
        self.layout = column(
            self.status,
            self.select,
            row(self.progress, self.instances),
            self.dag,
            Div(text="<h3>Recent runs</h3>"),
            self.runs,
            self.report_area,
        )

    def _choose(self, _attr: str, _old: Any, new: str) -> None:
        if self._choosing:
            return
        self.picked = True
        self.chosen = new or None
        self.shown_ended = None
        self.update(self.watcher.poll())

    def update(self, snapshot: Snapshot) -> None:
        """Show what ``snapshot`` found; called at every refresh."""
        summaries = self.summaries = snapshot.summaries
        self.runs.text = html_table(
            ["run", "started", "tasks", "status", "makespan s", "GB-s"],
            [
                [
                    s["run_id"],
                    time.strftime("%H:%M:%S", time.localtime(s.get("started") or 0)),
                    s.get("tasks"),
                    s.get("status"),
                    f"{s.get('actual_makespan_s') or 0.0:.3f}",
                    f"{s.get('cost_gb_s') or 0.0:.4f}",
                ]
                for s in summaries
            ],
        )
        options: Any = [(s["run_id"], f"{s['run_id'][:12]} ({s.get('status')})") for s in summaries]
        if [tuple(o) for o in cast("Any", self.select.options)] != options:
            self.select.options = options
        ids = [s["run_id"] for s in summaries]
        running = [r for r in ids if r in snapshot.live]
        if not self.picked and running and self.chosen not in running:
            self.chosen = running[0]
        if self.chosen not in ids:
            self.chosen = running[0] if running else (ids[0] if ids else None)
        if self.chosen is None:
            return
        if self.select.value != self.chosen:
            self._choosing = True
            try:
                self.select.value = self.chosen
            finally:
                self._choosing = False
        live = snapshot.live.get(self.chosen)
        if live is not None:
            self._show_live(live)
            return
        report = self.watcher.report(self.chosen)
        if report is not None and report.status != RUNNING:
            self._show_ended(report)

    def _show_live(self, live: LiveRun) -> None:
        report = live.report
        states = live.states()
        counts = Counter(states)
        total = len(states)
        self.status.text = (
            f"<h2>Run {report.run_id}: running</h2>"
            f"<p>{counts['done']} / {total} tasks done · {counts['ready']} ready (running or "
            f"queued) · {counts['failed']} failed · {counts['retried']} retried · cost so far "
            f"{live.cost_gb_s:.4f} GB-s · {len(live.instances)} instances</p>"
        )
        self._show_tasks(report, states)
        self.instances.text = instances_table(
            [
                (i.worker_id, i.memory_mb, i.cold, i.invocations, i.tasks)
                for i in live.instances.values()
            ]
        )
        if self.report_area.children:
            self.report_area.children = []

    def _show_ended(self, report: RunReport) -> None:
        if self.shown_ended == report.run_id:
            return
        self.shown_ended = report.run_id
        states = [t.state for t in report.tasks]
        counts = Counter(states)
        self.status.text = (
            f"<h2>Run {report.run_id}: {report.status}</h2>"
            f"<p>{counts['done']} / {len(states)} tasks done · {counts['failed']} failed · "
            f"cost {report.cost_gb_s:.4f} GB-s · makespan {report.actual_makespan_s:.3f} s · "
            f"{len({t.worker_id for t in report.tasks if t.worker_id})} instances</p>"
        )
        self._show_tasks(report, states)
        by_worker = Counter(t.worker_id for t in report.tasks if t.worker_id)
        invocations = report.invocation_records
        workers = list(dict.fromkeys([i.worker_id for i in invocations] + list(by_worker)))
        first = {i.worker_id: i for i in reversed(invocations)}
        self.instances.text = instances_table(
            [
                (
                    w,
                    first[w].memory_mb if w in first else None,
                    w in first and first[w].cold,
                    sum(1 for i in invocations if i.worker_id == w),
                    by_worker.get(w, 0),
                )
                for w in workers
            ]
        )
        drawn = cast("Any", report_layout(report, makespans(self.summaries)))
        self.report_area.children = [Div(text="<h3>Report</h3>"), drawn]

    def _show_tasks(self, report: RunReport, states: Sequence[str]) -> None:
        functions = [_function(t) for t in report.tasks]
        totals = Counter(functions)
        done = Counter(f for f, s in zip(functions, states, strict=True) if s == "done")
        names = sorted(totals)
        self.progress_range.factors = names or ["none"]
        self.progress_source.data = {
            "function": names,
            "done": [done[n] for n in names],
            "total": [totals[n] for n in names],
        }
        tasks = report.tasks[:MAX_NODES]
        shown = list(states[: len(tasks)])
        if self._layout_of != report.run_id:
            self._layout_of = report.run_id
            xs, ys = dag_layout(report)
            self.nodes.data = {
                "x": xs[: len(tasks)],
                "y": ys[: len(tasks)],
                "color": [STATE_COLORS.get(s, "#000000") for s in shown],
                "key": [str(t.key) for t in tasks],
                "state": shown,
            }
            edges = [(d, i) for i, t in enumerate(tasks) for d in t.dependencies][:MAX_EDGES]
            self.edges.data = {
                "x0": [xs[d] for d, _ in edges],
                "y0": [ys[d] for d, _ in edges],
                "x1": [xs[i] for _, i in edges],
                "y1": [ys[i] for _, i in edges],
            }
        elif self.nodes.data["state"] != shown:
            # Only the states change while a run goes on: send just those columns.
            self.nodes.data.update(
                color=[STATE_COLORS.get(s, "#000000") for s in shown], state=shown
            )


def make_document(watcher_factory: Any) -> Any:
    """The bokeh application function: one page and one watcher per browser tab."""

    def modify(document: Document) -> None:
        page = DashboardPage(watcher_factory())
        page.update(page.watcher.poll())
        document.add_root(page.layout)
        document.title = "dask-serverless dashboard"
        document.add_periodic_callback(lambda: page.update(page.watcher.poll()), REFRESH_MS)
        document.on_session_destroyed(lambda _context: page.watcher.close())

    return modify
