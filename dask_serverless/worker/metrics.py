"""What a worker measures of each task for the planner's history.

``TaskMeter`` times one task through the branch loop's stages — gather (download),
execute, publish (upload) — and sizes its inputs and output with ``dask.sizeof`` (the
same measure whether an input came from Redis or from this worker's memory), each value
once (``Branch.size_of``). The metrics
ride in the task's ``done`` event; the upload's duration, known only once the publish
script returned, follows in an ``up`` event of a later batch. Nothing here talks to Redis.
"""

from __future__ import annotations

import time
from typing import Any

from dask_serverless.protocol import events
from dask_serverless.worker.branch import Branch


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
        self.published_from = self.started

    def gathered(self) -> None:
        self.gathered_at = time.time()

    def done(self, inputs: dict[int, Any], value: Any) -> events.Event:
        """The task's ``done`` event, with its metrics."""
        branch, now = self.branch, time.time()
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
        ]
        self.published_from = now
        return events.done(self.index, branch.worker_id, self.started, now - self.started, metrics)

    def published(self, stored: bool) -> None:
        """After publish: report the upload's duration when the output was stored."""
        if stored:
            seconds = time.time() - self.published_from
            self.branch.pending_events.append(events.upload(self.index, seconds))
