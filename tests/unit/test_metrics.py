"""What a worker measures per task, read through descriptors kept open; no Redis."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from dask_serverless.backends.local.resources import GroupPeak
from dask_serverless.client.progress import RunProgress
from dask_serverless.graph import translate
from dask_serverless.protocol import events
from dask_serverless.worker.metrics import RunDelayClock
from tests.tasks import inc


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="schedstat is Linux's")
def test_run_delay_grows_while_another_thread_holds_the_cpu_and_reads_stay_fresh():
    clock = RunDelayClock()
    try:
        first = clock.seconds()
        # Compete with as many spinning threads as cores: this thread waits for a CPU.
        spinners = [
            threading.Thread(target=spin, args=(0.3,)) for _ in range(2 * (os.cpu_count() or 1))
        ]
        for spinner in spinners:
            spinner.start()
        spin(0.3)
        for spinner in spinners:
            spinner.join()
        later = clock.seconds()
        assert later > first  # one descriptor, re-read: the value moved
        assert clock.seconds() >= later
    finally:
        clock.close()
    assert clock.seconds() == 0.0  # closed: not measured


def test_group_peak_resets_and_reads_through_one_descriptor(tmp_path):
    # A stand-in for a cgroup v1 ``memory.max_usage_in_bytes`` (the kernel resets the real
    # one to the current usage on any write; here the written "0" is the new content).
    peak_file = tmp_path / "memory.max_usage_in_bytes"
    peak_file.write_text("7\n")
    probe = GroupPeak(str(peak_file))
    assert probe.peak_mb() == 7 / 2**20
    probe.reset()
    assert peak_file.read_text() == "0\n"
    assert probe.peak_mb() == 0
    os.pwrite(probe._descriptor(), b"%d\n" % (5 * 2**20), 0)
    assert probe.peak_mb() == 5
    assert probe._descriptor() == probe._descriptor()  # opened once


def test_a_missing_group_file_measures_nothing(tmp_path):
    probe = GroupPeak(str(tmp_path / "gone"))
    probe.reset()
    assert probe.peak_mb() == 0.0


def test_done_events_keep_one_copy_of_each_worker_and_invocation_id():
    dag = translate({"a": 1, "b": (inc, "a"), "c": (inc, "b")}, "c")
    metrics = [1769, 0, 8, 8, 0.0, 0.001, 0, 0.001, 60.0, 0.0, "invocation-1"]
    batch = events.encode([events.done(i, "local:123", 1.0, 0.1, metrics) for i in range(dag.sink)])
    progress = RunProgress(dag)
    progress.apply(events.decode(batch))
    first, second, *_ = progress.task_events
    assert first[2] == "local:123" and first[-1] == "invocation-1"
    assert first[2] is second[2]
    assert first[-1] is second[-1]
