"""Failures reach the caller as the task's own exception; bad input fails before dispatch."""

from __future__ import annotations

import threading
import traceback

import dask
import pytest

from dask_serverless import CycleError, RemoteError
from tests.tasks import fail, inc, raise_unpicklable, sleep_then, total


def test_task_error_keeps_type_message_and_remote_traceback(scheduler):
    bad = dask.delayed(fail)(dask.delayed(inc)(1))
    with pytest.raises(ValueError, match="task failed on 2") as info:
        dask.compute(bad, scheduler=scheduler)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "fail" in frames


def test_one_failing_branch_among_many_fails_the_run(scheduler):
    leaves = [dask.delayed(inc)(i) for i in range(40)]
    leaves[17] = dask.delayed(fail)(17)
    with pytest.raises(ValueError, match="task failed on 17"):
        dask.compute(dask.delayed(total)(leaves), scheduler=scheduler)


def test_unpicklable_exception_arrives_as_remote_error(scheduler):
    with pytest.raises(RemoteError, match="Unpicklable: unpicklable on 1") as info:
        dask.compute(dask.delayed(raise_unpicklable)(1), scheduler=scheduler)
    assert "raise_unpicklable" in info.value.traceback_text


def test_timeout_raises_and_cleans_up(scheduler):
    slow = dask.delayed(sleep_then)(1, 5)
    with pytest.raises(TimeoutError, match="did not finish within 0.5 s"):
        dask.compute(dask.delayed(inc)(slow), scheduler=scheduler, timeout=0.5)


def test_scheduler_is_usable_after_a_failure(scheduler):
    with pytest.raises(ValueError):
        dask.compute(dask.delayed(fail)(0), scheduler=scheduler)
    assert dask.compute(dask.delayed(inc)(41), scheduler=scheduler) == (42,)


def test_missing_key_raises_key_error(scheduler, redis_client):
    with pytest.raises(KeyError, match="missing"):
        scheduler({"a": 1}, ["a", "missing"])


def test_cycle_is_rejected(scheduler):
    with pytest.raises(CycleError, match="cycle"):
        scheduler({"a": (inc, "b"), "b": (inc, "a")}, "a")


def test_unpicklable_task_fails_before_dispatch(scheduler):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="lock"):
        scheduler({"a": (lambda _: 1, lock)}, "a")
