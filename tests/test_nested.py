"""A compute inside a task is a child run on the same Redis and the same platform."""

from __future__ import annotations

import os
import time

import dask
import pytest

import dask_serverless
from dask_serverless import Scheduler
from dask_serverless.client import scheduler as scheduler_module
from tests.conftest import run_keys
from tests.tasks import fail_first, inc, sleep_then


def fan_out(n: int) -> tuple[int, int, int, bool]:
    """A task that decides at run time how much work to start: ``n`` tasks, then their sum.

    Returns the sum, this worker's parent process, the parent process of the child run's
    workers (the same fork server: the same platform), and whether the task's process
    started an embedded default of its own (it must not).
    """
    children = [dask.delayed(parent_pid_and_inc)(i) for i in range(n)]
    results = dask.compute(children, scheduler=dask_serverless.get)[0]
    child_parents = {parent for parent, _ in results}
    assert len(child_parents) == 1, child_parents
    started_default = scheduler_module._default._scheduler is not None
    return sum(value for _, value in results), os.getppid(), child_parents.pop(), started_default


def parent_pid_and_inc(x: int) -> tuple[int, int]:
    return os.getppid(), x + 1


def nested_twice(n: int) -> int:
    inner = dask.delayed(fan_out)(n)
    return dask.compute(inner, scheduler=dask_serverless.get)[0][0] * 10


def fan_out_failing(n: int) -> int:
    parts = [dask.delayed(inc)(i) for i in range(n)]
    parts.append(dask.delayed(fail_with)("a child task failed"))
    return sum(dask.compute(parts, scheduler=dask_serverless.get)[0])


def fail_with(message: str) -> None:
    raise ValueError(message)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_task_fans_out_on_the_same_platform_within_the_concurrency(redis_url, concurrency):
    with Scheduler(redis=redis_url, concurrency=concurrency, timeout=120) as sched:
        outer = [dask.delayed(fan_out)(n) for n in (3, 5)]
        results = dask.compute(outer, scheduler=sched)[0]
    assert [total for total, *_ in results] == [6, 15]
    for _, parent, child_parent, started_default in results:
        assert parent == child_parent  # both forked by the same platform's fork server
        assert not started_default  # no embedded Redis, no pool of its own


def fan_out_through_a_scheduler(n: int, counter_path: str) -> tuple[int, int, int, bool, str]:
    """``fan_out`` through a ``Scheduler`` made in the task, with a setting of its own:
    one retry, which a flaky child needs. Also returns where the Scheduler's Redis is."""
    children = [dask.delayed(parent_pid_and_inc)(i) for i in range(n)]
    flaky = dask.delayed(fail_first)(0, counter_path, 1)
    with Scheduler(retries=1) as inner:
        results, extra = dask.compute(children, flaky, scheduler=inner)
        where = str(inner.redis_url)
    child_parents = {parent for parent, _ in results}
    assert len(child_parents) == 1, child_parents
    started_default = scheduler_module._default._scheduler is not None
    total = sum(value for _, value in results) + extra
    return total, os.getppid(), child_parents.pop(), started_default, where


@pytest.mark.parametrize("backend", ["local", "inline"])
def test_a_scheduler_made_in_a_task_nests_on_the_same_platform(redis_url, tmp_path, backend):
    with Scheduler(redis=redis_url, backend=backend, concurrency=1, timeout=120) as sched:
        task = dask.delayed(fan_out_through_a_scheduler)(3, str(tmp_path / "calls"))
        total, parent, child_parent, started_default, where = dask.compute(task, scheduler=sched)[0]
        assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)  # still serving
    assert total == 6
    assert parent == child_parent  # the child run's workers come from the same platform
    if backend == "local":  # inline tasks run in this process, where other tests ran
        assert not started_default
    assert where == sched.redis_url  # the same Redis, no embedded server of its own


def test_nested_runs_nest_twice_with_one_instance(redis_url):
    with Scheduler(redis=redis_url, concurrency=1, timeout=120) as sched:
        assert dask.compute(dask.delayed(nested_twice)(4), scheduler=sched) == (100,)


def test_a_failing_child_run_fails_the_parent_with_its_error(redis_url):
    with Scheduler(redis=redis_url, concurrency=2, timeout=120) as sched:
        with pytest.raises(ValueError, match="a child task failed"):
            dask.compute(dask.delayed(fan_out_failing)(3), scheduler=sched)
        # the platform still serves runs afterwards
        assert dask.compute(dask.delayed(fan_out)(2), scheduler=sched)[0][0] == 3


def test_nested_runs_with_the_inline_backend(redis_url):
    with Scheduler(redis=redis_url, backend="inline", timeout=120) as sched:
        assert dask.compute(dask.delayed(nested_twice)(3), scheduler=sched) == (60,)


def waits_on_slow_children(seconds: float) -> int:
    slow = [dask.delayed(sleep_then)(i, seconds) for i in range(2)]
    return sum(dask.compute(slow, scheduler=dask_serverless.get)[0])


def test_a_child_run_stops_and_cleans_up_when_its_parent_run_times_out(redis_url, redis_client):
    with Scheduler(redis=redis_url, concurrency=2, timeout=1.5, lease_timeout=1) as sched:
        with pytest.raises(TimeoutError):
            dask.compute(dask.delayed(waits_on_slow_children)(60), scheduler=sched)
        # The parent's heartbeat sees its run gone; the child run stops and deletes its keys.
        deadline = time.monotonic() + 25
        while run_keys(redis_client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not run_keys(redis_client)
