"""The inline backend: the same run, with every worker in the client's process."""

from __future__ import annotations

import os
import threading

import dask
import pytest

from dask_serverless import Scheduler
from tests.tasks import fail, inc, total


def where(_: object) -> tuple[int, str]:
    return os.getpid(), threading.current_thread().name


@pytest.fixture(scope="module")
def inline(redis_url):
    with Scheduler(redis=redis_url, backend="inline", timeout=60) as sched:
        yield sched


def test_a_fan_out_and_fan_in_give_the_threaded_result(inline):
    root = dask.delayed(inc)(1)
    leaves = [dask.delayed(inc)(root) for _ in range(20)]
    graph = dask.delayed(total)(leaves)
    assert dask.compute(graph, scheduler=inline) == dask.compute(graph, scheduler="threads")


def test_every_task_runs_in_the_client_thread(inline):
    parts = [dask.delayed(where)(i) for i in range(6)]
    found = dask.compute(*parts, scheduler=inline)
    assert set(found) == {(os.getpid(), threading.current_thread().name)}


def test_a_failing_task_raises_its_own_exception(inline):
    with pytest.raises(ValueError, match="task failed on 3"):
        dask.compute(dask.delayed(fail)(3), scheduler=inline)


def test_the_backend_is_named_and_plans_one_worker_at_a_time(inline):
    assert inline.backend.name == "inline"
    assert inline.backend.concurrency == 1
