"""The planner against real runs: learned predictions, CPU shares, out-of-memory, hints."""

from __future__ import annotations

import random
import statistics
import string
import time

import dask
import pytest
from dask._task_spec import Task, TaskRef

from dask_serverless import Scheduler
from dask_serverless.backends.local.resources import TaskOutOfMemoryError
from dask_serverless.planning.history import function_identity
from dask_serverless.protocol.keys import task_history_key

TASK_S = 0.2
SPIN_LOOPS = 4_000_000


def hold(*values):
    """A fixed-time task (sleeps, so its time does not depend on the CPU share)."""
    time.sleep(TASK_S)
    return len(values)


def spin(loops):
    """A CPU-bound task; returns the CPU seconds it used."""
    started = time.thread_time()
    total = 0
    for i in range(loops):
        total += i * i
    return time.thread_time() - started


def allocate(megabytes):
    block = bytearray(megabytes * 2**20)
    return len(block)


def fixed_time_workflow() -> tuple[dict, str]:
    """Chains of 5, 4, 3, 2 and 1 fixed-time tasks, all feeding one fixed-time sink."""
    name = "fixed" + "".join(random.choices(string.ascii_lowercase, k=8))
    graph = {}
    ends = []
    for chain, length in enumerate((5, 4, 3, 2, 1)):
        for step in range(length):
            key = (name, chain, step)
            args = (TaskRef((name, chain, step - 1)),) if step else ()
            graph[key] = Task(key, hold, *args)
        ends.append(TaskRef((name, chain, length - 1)))
    graph[f"{name}-sink"] = Task(f"{name}-sink", hold, *ends)
    return graph, f"{name}-sink"


def test_fixed_time_workflow_is_predicted_within_ten_percent(redis_url):
    graph, sink = fixed_time_workflow()
    # The median of the history (p50): on a busy machine the p95 of a few samples is a
    # deliberately pessimistic figure, not the prediction of a typical run.
    with Scheduler(
        redis=redis_url, planner="uniform", sla="p50", concurrency=8, timeout=60
    ) as sched:
        for _ in range(3):
            sched.get(graph, sink)
        assert sched.get(graph, sink) == 5
        run = sched.last_run
    assert run is not None
    assert len(run.tasks) == 16
    # Typical tasks within 10 %; on a busy machine one task may wait for a core a while.
    errors = sorted(abs(task.error) for task in run.tasks if task.error is not None)
    assert len(errors) == 16, str(run)
    assert statistics.median(errors) <= 0.10, str(run)
    assert errors[-1] <= 0.30, str(run)
    # The workflow after its first start is what the timeline simulates; the start-up
    # before it is a sample of the machine's load (a busy machine starts slower in some
    # runs than in others), so it is compared on its own. Within 10 % on an idle machine;
    # the 20 % allowed leaves room for the hand-offs between 16 tasks on a busy one.
    predicted_first = min(task.predicted_start_s for task in run.tasks)
    actual_first = min(task.actual_start_s or 0.0 for task in run.tasks)
    assert run.predicted_makespan_s - predicted_first == pytest.approx(
        run.actual_makespan_s - actual_first, rel=0.20
    ), str(run)
    assert abs(predicted_first - actual_first) < TASK_S, str(run)
    assert run.cost_gb_s > 0
    assert sum(t.on_critical_path for t in run.tasks) == 6  # the chain of 5, and the sink
    assert "pred s" in str(run) and run.planner == "uniform 1769 MB"


def test_cpu_share_prediction_matches_the_measured_slowdown(redis_url):
    """A 512 MB instance gets 512/1769 of a vCPU, as the planner predicts.

    Measured as each run's wall time over the CPU time the task used: that stretch is
    what the CPU share makes of the task, whatever else the machine runs. A loaded machine
    slows the 1769 MB instance (it competes for a whole core) but not the 512 MB one, whose
    quota is below its fair share; so the 512 MB stretch is compared with the predicted
    slowdown, and the 1769 MB one only must not beat a whole vCPU.
    """
    with Scheduler(redis=redis_url, planner="uniform-1769", concurrency=2, timeout=60) as sched:
        if not sched.backend.throttled:
            pytest.skip("cgroups are not writable here: the local backend runs unthrottled")
        task = dask.delayed(spin)(SPIN_LOOPS, dask_key_name="cpu-spin")
        stretch_1769 = []
        for _ in range(3):
            cpu_s = task.compute(scheduler=sched)
            stretch_1769.append(sched.last_run.tasks[0].actual_s / cpu_s)
        predicted_1769 = sched.plan(task.__dask_graph__(), task.key).predicted_s(0)
    with Scheduler(redis=redis_url, planner="uniform-512", concurrency=2, timeout=60) as small:
        predicted_512 = small.plan(task.__dask_graph__(), task.key).predicted_s(0)
        stretch_512 = []
        for _ in range(2):
            cpu_s = task.compute(scheduler=small)
            stretch_512.append(small.last_run.tasks[0].actual_s / cpu_s)
    assert predicted_512 > predicted_1769
    predicted_ratio = predicted_512 / predicted_1769
    details = f"wall / CPU at 1769 MB: {stretch_1769}, at 512 MB: {stretch_512}"
    assert min(stretch_1769) >= 0.9, details
    assert predicted_ratio == pytest.approx(min(stretch_512), rel=0.25), details


def test_a_task_over_its_memory_fails_as_out_of_memory(redis_url):
    with Scheduler(redis=redis_url, planner="uniform-512", concurrency=2, timeout=60) as sched:
        if not sched.backend.throttled:
            pytest.skip("cgroups are not writable here: no memory limit to exceed")
        greedy = dask.delayed(allocate)(900, dask_key_name="greedy-task")
        with pytest.raises(TaskOutOfMemoryError, match="greedy-task.*512 MB") as error:
            greedy.compute(scheduler=sched)
        assert isinstance(error.value, MemoryError)
        assert dask.delayed(allocate)(50).compute(scheduler=sched) == 50 * 2**20


def test_memory_annotation_overrides_the_planner(redis_url):
    with Scheduler(redis=redis_url, planner="uniform-512", concurrency=2, timeout=60) as sched:
        with dask.annotate(memory=3000):
            big = dask.delayed(allocate)(10, dask_key_name="annotated-big")
        small = dask.delayed(allocate)(1, dask_key_name="plain-small")
        total = dask.delayed(sum)([big, small], dask_key_name="annotated-total")
        assert total.compute(scheduler=sched) == 11 * 2**20
        memory = {t.key: t.memory_mb for t in sched.last_run.tasks}
    assert memory["annotated-big"] == 3008
    assert memory["plain-small"] == 512


def test_history_can_be_turned_off(redis_url, redis_client):
    task = dask.delayed(allocate)(1, dask_key_name="no-history-task")
    function = function_identity(task.key, task.__dask_graph__()[task.key])
    with Scheduler(redis=redis_url, history=False, concurrency=2, timeout=60) as sched:
        task.compute(scheduler=sched)
        assert sched.last_run is not None
        assert sched.last_run.planner.startswith("critical-path (no history)")
    assert not redis_client.exists(task_history_key(function, 1769))
