"""The live dashboard in a real headless Chromium: during a run and after it."""

from __future__ import annotations

import re
import threading
import time

import dask
import pytest

from dask_serverless import Scheduler
from dask_serverless.dashboard import Dashboard
from dask_serverless.dashboard.watch import LiveRun
from dask_serverless.report import RunReport, TaskRecord
from tests.browser import Chromium, chromium_binary, screenshot_dir
from tests.tasks import sleep_inc, total

needs_chromium = pytest.mark.skipif(chromium_binary() is None, reason="chromium not installed")


def task(index: int, dependencies: tuple[int, ...] = ()) -> TaskRecord:
    return TaskRecord(f"t-{index}", 512, 0.1, None, False, 0.0, 0.1, dependencies=dependencies)


def test_live_states_follow_the_event_stream():
    planned = RunReport("r", "uniform", "p95", [task(0), task(1), task(2, (0, 1))], 0, 0, 0, 0)
    live = LiveRun(planned)
    assert live.states() == ["ready", "ready", "waiting"]
    live.apply([["inv", "w1", 512, 1, 0.2], ["done", 0, "w1", 10.0, 0.1]])
    live.apply([["retry", 1, 1, "ValueError()"]])
    assert live.states() == ["done", "retried", "waiting"]
    live.apply([["done", 1, "w1", 10.2, 0.1], ["done", 1, "w1", 10.2, 0.1]])
    assert live.states() == ["done", "done", "ready"]
    live.apply([["error", 2]])
    assert live.states() == ["done", "done", "failed"]
    assert live.instances["w1"].tasks == 2 and live.instances["w1"].cold
    assert live.cost_gb_s > 0


def done_count(text: str, total_tasks: int) -> int:
    found = re.search(rf"(\d+) / {total_tasks} tasks done", text)
    assert found, text[:3000]
    return int(found.group(1))


@needs_chromium
def test_dashboard_shows_a_run_while_it_runs_and_after(redis_url, tmp_path):
    shots = screenshot_dir(tmp_path)
    ends = []
    for chain in range(6):  # six chains of four 0.4 s tasks, then their total: 25 tasks
        value = chain
        for _ in range(4):
            value = dask.delayed(sleep_inc, pure=False)(value, 0.4)
        ends.append(value)
    graph = dask.delayed(total, pure=False)(ends)
    # history=False: this Scheduler's cold starts stay out of the planner's shared history.
    with Scheduler(redis=redis_url, concurrency=2, timeout=120, history=False) as sched:
        dashboard = Dashboard(redis_url).start()
        browser = Chromium(tmp_path / "profile")
        try:
            browser.open(dashboard.url, expect="Recent runs")
            results: list = []
            runner = threading.Thread(
                target=lambda: results.append(dask.compute(graph, scheduler=sched))
            )
            runner.start()
            text = browser.wait_for(": running", timeout=60)
            run_id = re.search(r"Run ([0-9a-f]{32}): running", text).group(1)
            text = browser.wait_for("tasks done", timeout=30)
            deadline = time.monotonic() + 60
            while done_count(text, 25) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
                text = browser.wait_for("tasks done", timeout=30)
            during = done_count(text, 25)
            assert 0 < during < 25
            assert "cost so far" in text
            assert "local:" in text  # the instances table names the worker instances
            browser.screenshot(shots / "dashboard-during-run.png")
            runner.join(120)
            assert results == [(sum(range(6)) + 6 * 4,)]
            text = browser.wait_for(f"Run {run_id}: succeeded", timeout=60)
            assert done_count(text, 25) == 25
            text = browser.wait_for("planner", timeout=30)  # the run's report below
            assert "makespan predicted" in text
            browser.screenshot(shots / "dashboard-after-run.png")
        finally:
            browser.close()
            dashboard.stop()


def test_scheduler_starts_its_dashboard_and_prints_its_address(redis_url, capsys):
    import urllib.request

    with Scheduler(redis=redis_url, dashboard=True, history=False) as sched:
        link = sched.dashboard_link
        assert link is not None and link.startswith("http://127.0.0.1:")
        assert f"dask-serverless dashboard: {link}" in capsys.readouterr().out
        with urllib.request.urlopen(link, timeout=30) as page:
            assert b"dask-serverless dashboard" in page.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(link, timeout=5)
