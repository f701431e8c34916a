"""The embedded default behaves like dask's own schedulers: literals, warnings,
tracebacks, callbacks' times, settings and arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pytest
from dask.diagnostics import Profiler

import dask_serverless
from dask_serverless import Scheduler
from dask_serverless.client import _default
from tests.tasks import (
    TaskWarning,
    fail,
    fail_block,
    fail_first,
    inc,
    log_of,
    sleep_then,
    slow_block,
    warn_then,
)

ROOT = Path(__file__).resolve().parent.parent


# -- plain data keys -----------------------------------------------------------------


def test_literal_results_are_the_objects_themselves(scheduler):
    obj = {"a": [1, 2, 3]}
    assert dask.delayed(obj).compute(scheduler=scheduler) is obj
    both = dask.compute(dask.delayed(obj), dask.delayed(inc)(1), scheduler=scheduler)
    assert both[0] is obj and both[1] == 2


def test_an_all_literal_compute_starts_no_run(scheduler):
    dask.compute(dask.delayed(inc)(1), scheduler=scheduler)
    before = scheduler.last_run
    assert before is not None
    obj = object()
    assert scheduler.get({"x": obj, "y": 5}, ["x", "y"]) == (obj, 5)
    assert scheduler.last_run.run_id == before.run_id


# -- warnings ------------------------------------------------------------------------


def test_task_warnings_reach_the_caller_once_with_their_category(scheduler):
    parts = [dask.delayed(warn_then)(1) for _ in range(3)] + [dask.delayed(warn_then)(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dask.compute(parts, scheduler=scheduler) == ([1, 1, 1, 2],)
    ours = [w for w in caught if issubclass(w.category, TaskWarning)]
    assert sorted(str(w.message) for w in ours) == ["careful 1", "careful 2"]
    assert all(w.filename.endswith("tasks.py") for w in ours)


def test_pytest_warns_sees_numpy_runtime_warning(scheduler):
    with pytest.warns(RuntimeWarning, match="invalid value"):
        (value,) = dask.compute(dask.delayed(log_of)(-1.0), scheduler=scheduler)
    assert np.isnan(value)


def test_bag_take_warns_about_too_few_elements(scheduler):
    bag = db.from_sequence(range(10), npartitions=5)
    with dask.config.set(scheduler=scheduler), pytest.warns(UserWarning, match="Insufficient"):
        assert bag.take(5) == (0, 1)


def test_dataframe_head_warns_about_too_few_rows(scheduler):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    frame = dd.from_pandas(pd.DataFrame({"a": range(10)}), npartitions=5)
    with dask.config.set(scheduler=scheduler), pytest.warns(UserWarning, match="Insufficient"):
        assert len(frame.head(5, npartitions=1)) == 2


# -- tracebacks ----------------------------------------------------------------------


def test_traceback_has_no_engine_frames_and_names_the_key(scheduler):
    bad = dask.delayed(fail)(dask.delayed(inc)(1), dask_key_name="the-failing-task")
    with pytest.raises(ValueError, match="task failed on 2") as info:
        dask.compute(bad, scheduler=scheduler)
    files = [frame.filename for frame in traceback.extract_tb(info.value.__traceback__)]
    assert not [f for f in files[1:] if "dask_serverless" in f], files
    assert files[-1].endswith("tasks.py")
    assert any("the-failing-task" in note for note in info.value.__notes__)


SCRIPT = """
import dask
import dask_serverless


def explode(x):
    values = [x, x + 1]
    return values[5]  # the line that fails


if __name__ == "__main__":
    dask.compute(dask.delayed(explode)(1), scheduler=dask_serverless.get)
"""


def test_functions_from_main_show_their_source_lines(tmp_path):
    script = tmp_path / "explode.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1
    err = done.stderr
    assert "IndexError" in err
    assert "return values[5]  # the line that fails" in err
    assert f'File "{script}", line 8, in explode' in err
    assert "<dynamic-code>" not in err
    assert "run_branch" not in err and "worker/loop.py" not in err
    assert "raised by task 'explode-" in err


# -- callbacks -----------------------------------------------------------------------


def test_profiler_shows_the_tasks_real_durations(scheduler):
    parts = [dask.delayed(sleep_then)(i, 0.2) for i in range(3)]
    with Profiler() as prof:
        dask.compute(parts, scheduler=scheduler)
    durations = [task.end_time - task.start_time for task in prof.results]
    assert len(durations) == 3
    # Each task slept 0.2 s on its worker; the client learnt of it later, all at once.
    assert all(d >= 0.2 for d in durations), durations
    # On the Profiler's own clock: within the compute, not at the moment events arrived.
    assert prof.start_time <= min(task.start_time for task in prof.results)
    assert max(task.end_time for task in prof.results) <= time.perf_counter()


# -- settings and arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"timeout": -1}, "timeout"),
        ({"retries": 1.5}, "retries"),
        ({"lease_timeout": 0}, "lease_timeout"),
        ({"backend": "cloud"}, "backend"),
        ({"memory_configs": [512, -1]}, "memory_configs"),
    ],
)
def test_bad_scheduler_arguments_fail_up_front_naming_the_argument(arguments, named):
    with pytest.raises(ValueError, match=rf"Scheduler\({named}="):
        Scheduler(redis="redis://127.0.0.1:1", **arguments)


def test_bad_annotations_fail_naming_the_annotation_and_the_key(scheduler):
    with dask.annotate(memory="lots"):
        big = dask.delayed(inc)(1, dask_key_name="hungry")
    with pytest.raises(ValueError, match=r"memory='lots'\) on task 'hungry'"):
        dask.compute(big, scheduler=scheduler)
    with dask.annotate(retries=-2):
        flaky = dask.delayed(inc)(1, dask_key_name="flaky")
    with pytest.raises(ValueError, match=r"retries=-2\) on task 'flaky'"):
        dask.compute(flaky, scheduler=scheduler)


def test_repr_says_what_the_scheduler_is(scheduler, redis_url):
    text = repr(scheduler)
    assert "backend='local'" in text and "concurrency=" in text and "timeout=120" in text
    assert redis_url.split("@")[-1] in text


def test_the_default_reads_the_configuration_at_each_compute():
    assert dask.compute(dask.delayed(inc)(1), scheduler="serverless") == (2,)
    with dask.config.set({"serverless.local.concurrency": 7}):
        assert dask.compute(dask.delayed(inc)(2), scheduler=dask_serverless.get) == (3,)
        assert _default.get().backend.concurrency == 7
    assert dask.compute(dask.delayed(inc)(3), scheduler="serverless") == (4,)
    assert _default.get().backend.concurrency != 7


def test_a_scheduler_reads_the_configuration_at_each_compute(redis_url, tmp_path):
    flaky = dask.delayed(fail_first)(5, str(tmp_path / "calls"), 1)
    with Scheduler(redis=redis_url, timeout=120) as sched:
        started = sched.backend
        with dask.config.set({"serverless.retries": 1}):
            assert dask.compute(flaky, scheduler=sched) == (5,)
        assert sched.last_retries == {flaky.key: 1}
        assert sched.backend is started  # nothing it started changed
        with dask.config.set({"serverless.local.concurrency": 1}):
            assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)
            assert sched.backend.concurrency == 1 and sched.backend is not started
        assert dask.compute(dask.delayed(inc)(2), scheduler=sched) == (3,)
        assert sched.backend.concurrency != 1
        with (
            dask.config.set({"serverless.retries": -1}),
            pytest.raises(ValueError, match=r"serverless\.retries=-1"),
        ):
            dask.compute(dask.delayed(inc)(3), scheduler=sched)


def test_arguments_given_to_a_scheduler_win_over_the_configuration(redis_url, tmp_path):
    flaky = dask.delayed(fail_first)(5, str(tmp_path / "calls"), 1)
    configured = {"serverless.retries": 3, "serverless.local.concurrency": 2}
    with (
        Scheduler(redis=redis_url, timeout=120, retries=0, concurrency=1) as sched,
        dask.config.set(configured),
    ):
        with pytest.raises(ConnectionResetError, match="flaky call 1"):
            dask.compute(flaky, scheduler=sched)
        assert sched.backend.concurrency == 1


# -- large literals ------------------------------------------------------------------


def where_tasks_ran(report) -> dict[str, set[str]]:
    """The kinds of instance (``client``, ``local``) each task name ran on."""
    frame = report.to_frame()
    kinds: dict[str, set[str]] = {}
    for key, instance in zip(frame["key"], frame["instance"], strict=True):
        name = (key[0] if isinstance(key, tuple) else key).split("-")[0]
        kinds.setdefault(name, set()).add(instance.split(":")[0])
    return kinds


def test_persisted_arrays_reduce_from_literals_outside_the_record(scheduler):
    x = da.random.random((1000, 1000), chunks=250).persist(scheduler="threads")
    with dask.config.set({"serverless.planning.client-tasks": False}):
        total = x.sum().compute(scheduler=scheduler)
    assert np.isclose(total, x.sum().compute(scheduler="sync"))
    assert scheduler.last_run.client_tasks == 0
    assert set().union(*where_tasks_ran(scheduler.last_run).values()) == {"local"}


def test_a_reduction_of_persisted_data_runs_wholly_in_the_client(scheduler):
    x = da.random.random((1000, 1000), chunks=250).persist(scheduler="threads")
    total = x.sum().compute(scheduler=scheduler)
    assert np.isclose(total, x.sum().compute(scheduler="sync"))
    report = scheduler.last_run
    # Every task read only what the client holds: it also ended the run and deleted its
    # keys (the autouse fixture checks none is left); no worker was invoked.
    assert set().union(*where_tasks_ran(report).values()) == {"client"}
    assert report.client_tasks == len(report.tasks)
    assert report.invocations == 0 and report.cost_gb_s == 0
    assert any("no worker is needed" in note for note in report.notes)
    # The array itself (8 MB) stays in the client that assembled it, as with threads: it
    # never goes through Redis, so it is not held to max-output-bytes either.
    with dask.config.set({"serverless.max-output-bytes": 2**20}):
        whole = x.compute(scheduler=scheduler)
    np.testing.assert_array_equal(whole, x.compute(scheduler="sync"))
    assert scheduler.last_run.invocations == 0


def test_persisted_chunks_are_reduced_beside_them_in_the_client(scheduler):
    x = da.random.random((1000, 1000), chunks=250).persist(scheduler="threads")
    y = da.ones((1000, 1000), chunks=250)  # computed by the workers
    total = (x.sum() + y.sum()).compute(scheduler=scheduler)
    assert np.isclose(total, x.sum().compute(scheduler="sync") + 1e6)
    report = scheduler.last_run
    kinds = where_tasks_ran(report)
    # The chunks, fused into the tasks that sum them, and the cheap tree above them ran in
    # the client; the other array and what joins both sums ran on the workers.
    assert kinds["random_sample"] == {"client"}
    assert kinds["add"] == {"local"} and "local" in kinds["sum"]
    assert report.client_tasks == sum(
        1 for t in report.tasks if str(t.worker_id).startswith("client:")
    )
    assert any("run in the client" in note for note in report.notes)
    assert "in the client:" in report.summary()
    assert report.invocations >= 1 and report.cost_gb_s > 0  # the workers' part is billed


def test_a_task_found_costlier_than_moving_its_chunk_moves_to_the_workers(scheduler):
    # Blocks of 0.5 MB, each 0.6 s of work: far more than moving a block, even with the
    # transfer times a busy machine measures.
    x = da.random.random((500, 500), chunks=250).persist(scheduler="threads")
    slow = x.map_blocks(slow_block, 0.6, name="costly-blocks", dtype=float)
    expected = x.sum().compute(scheduler="sync") + 500 * 500
    # Unfused, so that the blocks' function is known by its own name.
    # Unknown: placed beside its chunk, and measured there.
    first = slow.sum().compute(scheduler=scheduler, optimize_graph=False)
    assert np.isclose(first, expected)
    assert where_tasks_ran(scheduler.last_run)["costly"] == {"client"}
    # Now known to cost far more than moving the chunk: run on the workers.
    second = slow.sum().compute(scheduler=scheduler, optimize_graph=False)
    assert np.isclose(second, expected)
    assert where_tasks_ran(scheduler.last_run)["costly"] == {"local"}


def test_warnings_of_tasks_run_in_the_client_reach_the_caller(scheduler):
    x = da.random.random((1000, 1000), chunks=500).persist(scheduler="threads")
    noisy = x.map_blocks(warn_then, "chunk warning", dtype=float).sum()
    with pytest.warns(TaskWarning, match="chunk warning"):
        total = noisy.compute(scheduler=scheduler)
    assert np.isclose(total, x.sum().compute(scheduler="sync"))
    assert scheduler.last_run.client_tasks > 0


def test_a_task_failing_in_the_client_fails_the_run_naming_its_key(scheduler):
    x = da.random.random((1000, 1000), chunks=500).persist(scheduler="threads")
    bad = x.map_blocks(fail_block, name="failing-blocks", dtype=float).sum()
    with pytest.raises(ValueError, match="bad block of shape") as info:
        bad.compute(scheduler=scheduler)
    # The task that failed is the chunk with the blocks' function fused into it.
    assert any("raised by task ('random_sample-" in note for note in info.value.__notes__)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == "fail_block"
    report = info.value.run_report
    assert report.status == "failed"
    assert "failed" in {t.state for t in report.tasks}
