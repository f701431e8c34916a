"""``performance_report``: one standalone HTML page of every run computed in a block.

As ``distributed.performance_report`` does for a cluster::

    with dask_serverless.performance_report("run.html"):
        x.compute(scheduler=sched)
        y.compute(scheduler=sched)

writes ``run.html`` when the block ends — also when it ends with an error, so a failed
run's report is in it too. The page embeds bokeh's JavaScript: it opens offline, without
a CDN. Which blocks are open is context-local state (a ``ContextVar``), so threads and
asyncio tasks each collect their own runs; the Scheduler hands every run's report to
``collect`` when the run ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from dask_serverless.report import RunReport

ReportSource = Callable[[], RunReport]

_open_reports: ContextVar[tuple[list[ReportSource], ...]] = ContextVar(
    "dask_serverless_performance_reports", default=()
)


def collect(source: ReportSource) -> None:
    """Hand a run's report (built when the block ends) to every open block."""
    for reports in _open_reports.get():
        reports.append(source)


@contextmanager
def performance_report(filename: str = "dask-serverless-report.html") -> Iterator[None]:
    """Write every run computed inside the block to ``filename``, one standalone page."""
    reports: list[ReportSource] = []
    token = _open_reports.set((*_open_reports.get(), reports))
    try:
        yield
    finally:
        _open_reports.reset(token)
        from dask_serverless.plot import save_reports

        save_reports([source() for source in reports], filename)
