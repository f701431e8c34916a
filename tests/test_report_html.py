"""Plots and the standalone HTML report, opened in a real headless Chromium."""

from __future__ import annotations

import dask
import pytest

import dask_serverless
from dask_serverless import plot
from tests.browser import Chromium, chromium_binary, screenshot_dir
from tests.tasks import fail, inc, sleep_inc, total

needs_chromium = pytest.mark.skipif(chromium_binary() is None, reason="chromium not installed")


def chains(count: int, length: int):
    ends = []
    for c in range(count):
        x = c
        for _ in range(length):
            x = dask.delayed(inc, pure=False)(x)
        ends.append(x)
    return dask.delayed(total, pure=False)(ends)


def legend_labels(figure) -> set[str]:
    return {item.label["value"] for legend in figure.legend for item in legend.items}


def test_plot_draws_lanes_plans_critical_path_and_cold_starts(scheduler):
    leaves = [dask.delayed(sleep_inc, pure=False)(i, 0.05) for i in range(6)]
    dask.compute(dask.delayed(total, pure=False)(leaves), scheduler=scheduler)
    report = scheduler.last_run
    gantt = plot.gantt(report)
    labels = legend_labels(gantt)
    assert {"planned", "critical path"} <= labels
    assert any(label.endswith(" MB") for label in labels)
    lanes = {t.worker_id for t in report.tasks}
    assert set(gantt.y_range.factors) == lanes
    if any(t.cold for t in report.tasks):
        assert "cold start" in labels
    layout = report.plot()
    assert layout.children[0].text.startswith(f"<h2>Run {report.run_id}: succeeded")


def test_large_runs_are_aggregated(scheduler):
    dask.compute(chains(30, 90), scheduler=scheduler)
    report = scheduler.last_run
    assert len(report.tasks) > plot.MAX_BARS
    bars = plot._bars(report.tasks, planned=False, merge_gap_s=report.actual_makespan_s / 1500)
    assert len(bars["lane"]) < len(report.tasks)
    assert sum(bars["tasks"]) == len(report.tasks)


@needs_chromium
def test_performance_report_writes_every_run_to_one_offline_page(scheduler, tmp_path):
    page = tmp_path / "run.html"
    with pytest.raises(ValueError), dask_serverless.performance_report(str(page)):
        dask.compute(chains(4, 5), scheduler=scheduler)
        first = scheduler.last_run
        dask.compute(dask.delayed(fail)(dask.delayed(inc)(1)), scheduler=scheduler)
    second = scheduler.last_run
    html = page.read_text()
    assert "cdn.bokeh.org" not in html and '<script src="http' not in html
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(page.as_uri(), expect="2 dask-serverless runs")
        text = browser.wait_for(first.run_id)
        assert f"{len(first.tasks)} tasks, {len(first.tasks)} done" in text
        assert f"1: {first.run_id[:8]} (succeeded)" in text
        assert f"2: {second.run_id[:8]} (failed)" in text
        browser.screenshot(screenshot_dir(tmp_path) / "report-two-runs.png")
    finally:
        browser.close()


@needs_chromium
def test_large_report_opens_in_the_browser(scheduler, tmp_path):
    dask.compute(chains(30, 90), scheduler=scheduler)
    report = scheduler.last_run
    path = report.to_html(str(tmp_path / "large.html"))
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(f"file://{path}", expect=f"Run {report.run_id}")
        text = browser.text()
        assert f"{len(report.tasks)} tasks, {len(report.tasks)} done" in text
        assert "neighbouring bars merged" in text or len(report.tasks) <= plot.MAX_BARS
        browser.screenshot(screenshot_dir(tmp_path) / "report-large-run.png")
    finally:
        browser.close()
