"""What a worker measures of each task for the planner's history.

``TaskMeter`` times one task through the branch loop's stages — gather (download),
execute, publish (upload) — and sizes its inputs and output with ``dask.sizeof`` (the
same measure whether an input came from Redis or from this worker's memory), each value
once (``Branch.size_of``). Beside the wall time of the execution it measures the CPU time
the process spent in it (``time.process_time``: all threads, so a BLAS call counts in
full), which tells the planner how much of the task scales with the CPU share, the time
the task was ready to run but waited for a CPU (the kernel's run delay: a CPU quota's
throttling and other processes' contention — neither is the task's own waiting), and the
peak memory the task reached (``MemoryProbe``). The metrics
ride in the task's ``done`` event; the upload's duration, known only once the publish
script returned, follows in an ``up`` event of a later batch. Nothing here talks to Redis.
"""

from __future__ import annotations

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


def run_delay_s() -> float:
    """Seconds this thread has waited, runnable, for a CPU (0.0 where not measured)."""
    try:
        with open(_SCHEDSTAT) as file:
            return int(file.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


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
        self.delay_from = run_delay_s()
        self.gathered_at = time.time()

    def done(self, inputs: dict[int, Any], value: Any) -> events.Event:
        """The task's ``done`` event, with its metrics."""
        branch, now = self.branch, time.time()
        cpu_s = time.process_time() - self.cpu_from
        delay_s = run_delay_s() - self.delay_from
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
