"""A run's report as data: one row per task, a JSON round trip, and reports of failed runs."""

from __future__ import annotations

import dask
import pytest

from dask_serverless.report import RunReport
from tests.tasks import fail, inc, sleep_then, total


def diamond():
    a = dask.delayed(inc, pure=False)(1)
    b = dask.delayed(inc, pure=False)(a)
    c = dask.delayed(inc, pure=False)(a)
    return dask.delayed(total, pure=False)([b, c])


def test_frame_has_one_row_per_task_planned_next_to_actual(scheduler):
    (value,) = dask.compute(diamond(), scheduler=scheduler)
    assert value == 6
    report = scheduler.last_run
    assert report.status == "succeeded"
    frame = report.to_frame()
    assert len(frame) == 4
    assert set(frame["state"]) == {"done"}
    assert frame["function"].str.startswith("inc:").sum() == 3
    assert (frame["actual_finish_s"] >= frame["actual_start_s"]).all()
    assert (frame["planned_finish_s"] >= frame["planned_start_s"]).all()
    assert frame["instance"].notna().all()
    assert frame["memory_mb"].notna().all()
    assert (frame["output_bytes"] > 0).all()
    assert (frame["cost_gb_s"] > 0).all()
    assert frame["critical_path"].any()
    # The total's input is both incs' outputs.
    totals = frame[frame["function"].str.startswith("total:")]
    assert int(totals["input_bytes"].iloc[0]) > 0
    assert frame["cost_gb_s"].sum() <= report.cost_gb_s + 1e-9


def test_json_round_trip_keeps_every_task_and_number(scheduler):
    arrays = dask.delayed(total)([dask.delayed(inc)(i) for i in range(5)])
    dask.compute(arrays, scheduler=scheduler)
    report = scheduler.last_run
    again = RunReport.from_json(report.to_json())
    assert again == report
    assert again.to_frame().equals(report.to_frame())
    assert [t.key for t in again.tasks] == [t.key for t in report.tasks]


def test_tuple_keys_survive_the_round_trip(scheduler):
    import dask.array as da

    x = da.ones((4, 4), chunks=2)
    dask.compute(x.sum(), scheduler=scheduler)
    report = scheduler.last_run
    again = RunReport.from_json(report.to_json())
    assert any(isinstance(t.key, tuple) for t in again.tasks)
    assert [t.key for t in again.tasks] == [t.key for t in report.tasks]


def test_failed_run_has_a_report_on_the_exception_and_last_run(scheduler):
    leaves = [dask.delayed(inc)(i) for i in range(6)]
    bad = dask.delayed(fail)(dask.delayed(total)(leaves))
    with pytest.raises(ValueError, match="task failed") as info:
        dask.compute(bad, scheduler=scheduler)
    report = info.value.run_report
    assert scheduler.last_run is report
    assert report.status == "failed"
    assert "task failed" in report.error
    states = report.to_frame().set_index("function")["state"]
    assert states[states.index.str.startswith("fail:")].tolist() == ["failed"]
    assert (states[states.index.str.startswith("inc:")] == "done").all()
    assert "FAILED" in str(report)
    assert RunReport.from_json(report.to_json()) == report


def test_timed_out_run_has_a_report(scheduler):
    slow = dask.delayed(sleep_then)(1, 5)
    with pytest.raises(TimeoutError) as info:
        dask.compute(dask.delayed(inc)(slow), scheduler=scheduler, timeout=0.5)
    report = info.value.run_report
    assert report.status == "timed out"
    assert scheduler.last_run is report
    assert {t.state for t in report.tasks} <= {"waiting", "ready"}
    assert report.actual_makespan_s >= 0.5


def test_cancelled_run_has_a_report_with_what_finished(scheduler):
    value = dask.delayed(sleep_then)(0, 0.2)
    for _ in range(10):
        value = dask.delayed(sleep_then)(value, 0.2)

    class InterruptAfterTwoTasks(dask.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            self.seen += 1
            if self.seen == 2:
                raise KeyboardInterrupt

    with InterruptAfterTwoTasks(), pytest.raises(KeyboardInterrupt) as info:
        dask.compute(value, scheduler=scheduler)
    report = info.value.run_report
    assert scheduler.last_run is report
    assert report.status == "cancelled"
    states = [t.state for t in report.tasks]
    assert states.count("done") >= 2
    assert "waiting" in states
