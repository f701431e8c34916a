"""The local pool behaves like a serverless platform."""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import time

import dask
import pytest

from dask_serverless import Scheduler
from dask_serverless.backends.local import LocalBackend
from dask_serverless.backends.local.forkserver import shared_fork_server
from dask_serverless.backends.local.resources import Cgroups
from dask_serverless.storage.serialize import new_secret
from tests.tasks import big_bytes, main_module_file, pid_with, sleep_then


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_concurrency_limit_caps_live_instances(redis_url):
    with Scheduler(redis=redis_url, concurrency=3, timeout=120) as sched:
        pids = dask.compute([dask.delayed(pid_after)(0.05) for _ in range(24)], scheduler=sched)[0]
        assert 1 <= len(set(pids)) <= 3
        assert sched.backend.live_instances() <= 3


def test_high_concurrency_runs_io_bound_tasks_in_many_instances(redis_url):
    with Scheduler(redis=redis_url, concurrency=16, timeout=120) as sched:
        assert dask.compute([dask.delayed(sleep_then)(i, 0.01) for i in range(4)], scheduler=sched)[
            0
        ] == list(range(4))
        pids = dask.compute([dask.delayed(pid_after)(0.5) for _ in range(16)], scheduler=sched)[0]
        assert len(set(pids)) > 2


def test_warm_instances_are_reused_and_idle_ones_reaped(redis_url):
    secret = new_secret()
    backend = LocalBackend(redis_url, secret, concurrency=1, keep_alive_s=0.5)
    with Scheduler(redis=redis_url, backend=backend, secret=secret, timeout=60) as sched:
        first = dask.compute(dask.delayed(os.getpid)(), scheduler=sched)[0]
        second = dask.compute(dask.delayed(os.getpid)(), scheduler=sched)[0]
        assert first == second
        deadline = time.monotonic() + 10
        while backend.live_instances() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.live_instances() == 0
        third = dask.compute(dask.delayed(os.getpid)(), scheduler=sched)[0]
        assert third != first


def test_closed_backend_refuses_invocations(redis_url):
    backend = LocalBackend(redis_url, new_secret())
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.invoke([{}])


def test_consumers_of_a_large_output_run_where_it_is(redis_url):
    """Task clustering: a big output is not shipped to many workers, its readers come to it."""
    with (
        dask.config.set({"serverless.cluster-output-bytes": 10_000}),
        Scheduler(redis=redis_url, concurrency=4, timeout=60) as sched,
    ):
        big = dask.delayed(big_bytes)(100_000)
        assert (
            len(
                set(
                    dask.compute([dask.delayed(pid_with)(big) for _ in range(6)], scheduler=sched)[
                        0
                    ]
                )
            )
            == 1
        )
        small = dask.delayed(big_bytes)(10)
        pids = dask.compute(
            [dask.delayed(pid_with)(small, 0.3) for _ in range(6)], scheduler=sched
        )[0]
        assert len(set(pids)) > 1


def unbootable_environment() -> None:
    raise ValueError("this instance cannot reach its configuration")


def test_instances_that_cannot_boot_stop_the_platform_with_their_reason(redis_url):
    secret = new_secret()
    backend = LocalBackend(redis_url, secret, worker_environment=unbootable_environment)
    with Scheduler(redis=redis_url, backend=backend, secret=secret, timeout=120) as sched:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="cannot reach its configuration"):
            dask.compute(dask.delayed(os.getpid)(), scheduler=sched)
        assert time.monotonic() - started < 60


def test_an_instance_runs_the_platform_main_module_not_the_clients(scheduler):
    instance_main = dask.compute(dask.delayed(main_module_file)(), scheduler=scheduler)[0]
    assert instance_main.endswith(
        os.path.join("dask_serverless", "backends", "local", "__main__.py")
    )


def test_the_fork_server_reports_how_an_instance_ended():
    """Instances are not the client's children; their handle still gives the exit code."""
    server = shared_fork_server()
    ours, theirs = multiprocessing.connection.Pipe()
    stopped = server.fork([theirs.fileno()])
    theirs.close()
    ours.close()  # no settings, no dispatcher: the instance exits quietly
    stopped.join(timeout=30)
    assert stopped.exitcode == 0
    ours, theirs = multiprocessing.connection.Pipe()
    killed = server.fork([theirs.fileno()])
    theirs.close()
    assert killed.is_alive()
    killed.kill()
    killed.join(timeout=30)
    assert killed.exitcode == -signal.SIGKILL
    ours.close()
    for process in (stopped, killed):
        process.close()


def test_the_pool_weighs_on_a_busy_machine_like_one_process_per_core():
    """The instances' base group has the CPU weight of one busy process per core: beside
    other busy processes, the pool together gets what a program with that many busy
    threads gets, not one process's share."""
    cgroups, reason = Cgroups.detect(cores=3)
    if cgroups is None:
        pytest.skip(reason)
    try:
        if cgroups.version == 2:
            path, default = os.path.join(cgroups.bases[""], "cpu.weight"), 100
        else:
            path, default = os.path.join(cgroups.bases["cpu"], "cpu.shares"), 1024
        with open(path) as file:
            assert int(file.read()) == 3 * default
    finally:
        cgroups.close()
