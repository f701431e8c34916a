"""Dask's callbacks and progress bar are driven by the run's events."""

from __future__ import annotations

import dask
import pytest
from dask.callbacks import Callback
from dask.diagnostics import ProgressBar

from tests.tasks import fail, inc, total


class Recorder(Callback):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.done = []

    def _start(self, dsk):
        self.calls.append("start")

    def _start_state(self, dsk, state):
        self.calls.append("start_state")
        self.initial_waiting = len(state["waiting"]) + len(state["ready"])

    def _pretask(self, key, dsk, state):
        self.calls.append("pretask")

    def _posttask(self, key, result, dsk, state, worker_id):
        self.done.append(key)

    def _finish(self, dsk, state, errored):
        self.calls.append(("finish", errored))


def test_callbacks_see_every_task(scheduler):
    leaves = [dask.delayed(inc)(i) for i in range(10)]
    result = dask.delayed(total)(leaves)
    recorder = Recorder()
    with recorder:
        assert dask.compute(result, scheduler=scheduler) == (55,)
    assert recorder.calls[:2] == ["start", "start_state"]
    assert recorder.calls[-1] == ("finish", False)
    assert recorder.calls.count("pretask") == len(recorder.done) == recorder.initial_waiting == 11
    assert result.key in recorder.done


def test_finish_is_called_when_the_run_fails(scheduler):
    recorder = Recorder()
    with recorder, pytest.raises(ValueError):
        dask.compute(dask.delayed(fail)(1), scheduler=scheduler)
    assert recorder.calls[-1] == ("finish", True)


def test_progress_bar_reaches_100_percent(scheduler, capsys):
    leaves = [dask.delayed(inc)(i) for i in range(20)]
    with ProgressBar(dt=0.01):
        dask.compute(dask.delayed(total)(leaves), scheduler=scheduler)
    out = capsys.readouterr().out
    assert "100% Completed" in out
