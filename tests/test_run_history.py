"""The run history in Redis, bounded, and the `runs`, `report` and `history` commands."""

from __future__ import annotations

import threading
import time

import dask
import pytest
import redis
from click.testing import CliRunner

from dask_serverless import Scheduler, recording
from dask_serverless.cli import main
from dask_serverless.protocol.runs import RUNS_KEY, RunHistory
from dask_serverless.report import RunReport
from tests.tasks import fail, inc, sleep_inc, total


def saved(client: redis.Redis, run_id: str, status: str, timeout: float = 30) -> RunReport:
    """The run's report once the history holds it with ``status`` (saving is background)."""
    history = RunHistory(client)
    deadline = time.monotonic() + timeout
    while True:
        (text,) = history.load([run_id])
        if text is not None and RunReport.from_json(text).status == status:
            return RunReport.from_json(text)
        assert time.monotonic() < deadline, f"run {run_id} never saved as {status}"
        time.sleep(0.05)


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_runs_and_reports_stay_after_the_run(scheduler, redis_client, redis_url):
    leaves = [dask.delayed(sleep_inc, pure=False)(i, 0.02) for i in range(8)]
    dask.compute(dask.delayed(total, pure=False)(leaves), scheduler=scheduler)
    good = scheduler.last_run
    with pytest.raises(ValueError):
        dask.compute(dask.delayed(fail)(3), scheduler=scheduler)
    bad = scheduler.last_run
    assert saved(redis_client, good.run_id, "succeeded") == good
    assert saved(redis_client, bad.run_id, "failed") == bad

    listing = cli("runs", "--redis", redis_url)
    lines = listing.splitlines()
    assert lines[0].split()[:3] == ["started", "run", "tasks"]
    newest, older = lines[2], lines[3]
    assert bad.run_id in newest and newest.rstrip().endswith("failed")
    assert good.run_id in older and " 9 " in older and older.rstrip().endswith("succeeded")

    printed = cli("report", good.run_id[:10], "--redis", redis_url)
    assert f"Run {good.run_id}" in printed
    assert printed.count("sleep_inc-") == 8


def test_report_command_writes_html(scheduler, redis_client, redis_url, tmp_path):
    dask.compute(dask.delayed(inc)(1), scheduler=scheduler)
    run = scheduler.last_run
    saved(redis_client, run.run_id, "succeeded")
    page = tmp_path / "one.html"
    assert "wrote" in cli("report", run.run_id, "--redis", redis_url, "--html", str(page))
    assert f"Run {run.run_id}: succeeded" in page.read_text()


def test_history_command_shows_samples_fit_and_errors(scheduler, redis_client, redis_url):
    for _ in range(2):
        leaves = [dask.delayed(sleep_inc, pure=False)(i, 0.03) for i in range(4)]
        dask.compute(dask.delayed(total, pure=False)(leaves), scheduler=scheduler)
    saved(redis_client, scheduler.last_run.run_id, "succeeded")
    shown = cli("history", "sleep_inc", "--redis", redis_url)
    assert "sleep_inc:tests.tasks.sleep_inc: samples per memory size" in shown
    assert "prediction error over time" in shown
    assert scheduler.last_run.run_id in shown


def test_history_keeps_only_the_newest_runs(redis_url, redis_client):
    keep_two = dask.config.set({"serverless.history.runs": 2})
    with keep_two, Scheduler(redis=redis_url, history=False) as sched:
        ids = []
        for i in range(4):
            dask.compute(dask.delayed(inc)(i), scheduler=sched)
            ids.append(sched.last_run.run_id)
        saved(redis_client, ids[-1], "succeeded")
    kept = [r.decode() for r in redis_client.zrange(RUNS_KEY, 0, -1)]
    assert ids[-2:] == kept[-2:]
    assert len(kept) == 2
    assert RunHistory(redis_client).load(ids[:2]) == [None, None]


def test_a_run_in_progress_has_its_planned_report_and_a_short_one_only_its_final(
    scheduler, redis_client, monkeypatch
):
    history = RunHistory(redis_client)
    seen_running: list[str] = []
    leaves = [dask.delayed(sleep_inc, pure=False)(i, 1.5) for i in range(2)]
    slow = dask.delayed(total, pure=False)(leaves)
    done = []
    runner = threading.Thread(target=lambda: done.append(dask.compute(slow, scheduler=scheduler)))
    runner.start()
    deadline = time.monotonic() + 30
    while runner.is_alive() and time.monotonic() < deadline and not seen_running:
        for run_id, _started in history.recent(3):
            (text,) = history.load([run_id])
            if text is not None and RunReport.from_json(text).status == "running":
                seen_running.append(run_id)
        time.sleep(0.05)
    runner.join(60)
    assert done == [(3,)]
    assert seen_running == [scheduler.last_run.run_id]
    assert len(RunReport.from_json(history.load(seen_running)[0] or "").tasks) == 3
    saved(redis_client, seen_running[0], "succeeded")

    built: list[str] = []
    build = recording.build_report

    def counted(*args, **kwargs):
        report = build(*args, **kwargs)
        built.append(report.status)
        return report

    monkeypatch.setattr(recording, "build_report", counted)
    dask.compute(dask.delayed(inc)(1), scheduler=scheduler)
    quick = scheduler.last_run.run_id
    scheduler._recorder.flush()
    assert built == ["succeeded"]  # no planned report for a run over within half a second
    assert RunReport.from_json(history.load([quick])[0] or "").status == "succeeded"
