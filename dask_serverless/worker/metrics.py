"""What a worker measures of each task for the planner's history.

``TaskMeter`` times one task through the branch loop's stages — gather (download),
execute, publish (upload) — and sizes its inputs and output with ``dask.sizeof`` (the
same measure whether an input came from Redis or from this worker's memory), each value
once per run: its producer sizes it and a stored output carries that size to its readers
(``Branch.size_of``). Beside the wall time of the execution it measures the CPU time
the process spent in it (``time.process_time``: all threads, so a BLAS call counts in
full), which tells the planner how much of the task scales with the CPU share, the time
the task was ready to run but waited for a CPU (the kernel's run delay: a CPU quota's
throttling and other processes' contention — neither is the task's own waiting), and the
peak memory the task reached (``MemoryProbe``). The metrics
ride in the task's ``done`` event; the upload's duration, known only once the publish
script returned, follows in an ``up`` event of a later batch. Nothing here talks to Redis.

Every measurement is a system call, never a file opened per task: opening a ``/proc`` or
cgroup file costs some 30 µs, more than a small task itself, so the run delay is read
through a descriptor the branch keeps open (``RunDelayClock``), and a cgroup's peak
through one its instance keeps open (``backends.local.resources.GroupPeak``).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

from dask_serverless.protocol import events
from dask_serverless.worker.branch import Branch


class ProcessPeak:
    """A ``MemoryProbe`` (``worker.branch``): the process's peak resident memory
    (``getrusage``). It cannot be reset, so a task is charged the highest peak of its
    instance so far — an upper bound, which errs on the safe side for planning. Backends
    that can measure per task (a cgroup) install their own probe."""

    def reset(self) -> None:
        return None

    def peak_mb(self) -> float:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # kilobytes on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


_SCHEDSTAT = "/proc/thread-self/schedstat"


class RunDelayClock:
    """Seconds the thread that made it has waited, runnable, for a CPU (the kernel's
    ``schedstat``); 0.0 where the kernel does not tell.

    The file is opened once, by the thread that runs the branch (``/proc/thread-self``
    names the opening thread), and re-read from its start for every reading: procfs
    regenerates it on each read, so a reading costs one ``pread``.
    """

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open(_SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def seconds(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _delay_s(branch: Branch) -> float:
    return 0.0 if branch.run_delay is None else branch.run_delay.seconds()


class TaskMeter:
    """Times and sizes one task; see the module docstring."""

    def __init__(self, branch: Branch, index: int) -> None:
        self.branch = branch
        self.index = index
        if branch.on_task is not None:
            branch.on_task(branch, index)
        self.held = {p for p in branch.dag.dependencies[index] if p in branch.values}
        self.started = time.time()
        self.gathered_at = self.started
        self.cpu_from = 0.0
        self.delay_from = 0.0
        self.published_from = self.started

    def gathered(self) -> None:
        if self.branch.memory_probe is not None:
            self.branch.memory_probe.reset()
        self.cpu_from = time.process_time()
        self.delay_from = _delay_s(self.branch)
        self.gathered_at = time.time()

    def done(self, inputs: dict[int, Any], value: Any) -> events.Event:
        """The task's ``done`` event, with its metrics."""
        branch, now = self.branch, time.time()
        cpu_s = time.process_time() - self.cpu_from
        delay_s = _delay_s(branch) - self.delay_from
        probe = branch.memory_probe
        peak_mb = probe.peak_mb() if probe is not None else 0.0
        sizes = {p: branch.size_of(p, v) for p, v in inputs.items()}
        downloaded = sum(size for p, size in sizes.items() if p not in self.held)
        metrics = [
            branch.memory_mb or 0,
            int(branch.cold),
            sum(sizes.values()),
            branch.size_of(self.index, value),
            round(self.gathered_at - self.started, 6),
            round(now - self.gathered_at, 6),
            downloaded,
            round(cpu_s, 6),
            round(peak_mb, 1),
            round(delay_s, 6),
            branch.invocation_id,
        ]
        self.published_from = now
        return events.done(self.index, branch.worker_id, self.started, now - self.started, metrics)

    def published(self, stored: bool) -> None:
        """After publish: report the upload's duration when the output was stored."""
        if stored:
            seconds = time.time() - self.published_from
            self.branch.pending_events.append(events.upload(self.index, seconds))
