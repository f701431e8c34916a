"""What the dashboard knows of the runs: folded from the run history and the event streams.

A ``RunWatcher`` polls Redis (once per page refresh, a bounded number of round trips):

* the newest runs and their summaries from the run history (``protocol.runs``) — runs in
  progress are there too, with state ``running``, because the Scheduler saves each run's
  planned report when it starts;
* for every run in progress, its planned report once (task keys, functions, dependencies,
  planned memory and times) and then, at every poll, the new entries of the run's event
  stream — the stream the workers write for the client anyway, read from where the last
  poll stopped. Watching adds no work for the workers.

Task states follow the events: ``done`` once a worker reported it, ``failed`` for the
task whose error ended the run, ``retried`` while it raised and is being retried,
``ready`` when every dependency is done (it runs, or waits for a free worker), else
``waiting``. Workers report a task when it finishes, not when it starts — a start event
would cost every task a write — so "ready" is as close to "running" as the stream says.
When a run ends, the Scheduler deletes its stream and saves the final report, which the
watcher then shows instead. A run whose report still says ``running`` but whose keys are
gone (its client died, or it just ended and its final report is on its way) is not
followed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from dask_serverless.planning.history import task_metrics
from dask_serverless.protocol import events
from dask_serverless.protocol.runs import RunHistory
from dask_serverless.protocol.store import RunStore, Scripts
from dask_serverless.report import RUNNING, RunReport, busy_gb_s

RECENT_RUNS = 20


@dataclass
class Instance:
    """A worker instance as the events describe it."""

    worker_id: str
    memory_mb: int | None
    cold: bool
    invocations: int = 0
    tasks: int = 0


@dataclass
class LiveRun:
    """One run in progress: its planned report and what its events said so far."""

    report: RunReport
    cursor: bytes = b"0-0"
    done: set[int] = field(default_factory=set)
    retried: set[int] = field(default_factory=set)
    failed: int | None = None
    finished: bool = False
    task_cost_gb_s: float = 0.0
    startup_cost_gb_s: float = 0.0
    instances: dict[str, Instance] = field(default_factory=dict)
    finished_at: dict[int, float] = field(default_factory=dict)

    def apply(self, batch: list[events.Event]) -> None:
        """Fold one batch of events into the run's state."""
        for event in batch:
            kind = event[0]
            if kind == events.DONE:
                self._task_done(event)
            elif kind in (events.RETRY, events.OUT_OF_MEMORY):
                self.retried.add(int(event[1]))
            elif kind == events.ERROR and self.failed is None:
                self.failed = int(event[1])
            elif kind == events.FINISHED:
                self.finished = True
            elif kind == events.INVOCATION:
                worker_id, memory, cold, startup = str(event[1]), event[2], bool(event[3]), event[4]
                instance = self.instances.setdefault(
                    worker_id, Instance(worker_id, int(memory) or None, cold)
                )
                instance.invocations += 1
                if cold:
                    self.startup_cost_gb_s += busy_gb_s(int(memory) or None, float(startup))

    def _task_done(self, event: events.Event) -> None:
        index = int(event[1])
        if index in self.done:
            return
        self.done.add(index)
        self.retried.discard(index)
        worker_id = str(event[2])
        self.finished_at[index] = float(event[3]) + float(event[4])
        metrics = task_metrics(event)
        memory = None if metrics is None else metrics.memory_mb
        if metrics is not None:
            self.task_cost_gb_s += busy_gb_s(memory, metrics.total_s)
        instance = self.instances.setdefault(worker_id, Instance(worker_id, memory, False))
        instance.tasks += 1

    def states(self) -> list[str]:
        """Every task's state now (see module docstring)."""
        tasks = self.report.tasks
        states = []
        for index, task in enumerate(tasks):
            if index in self.done:
                states.append("done")
            elif index == self.failed:
                states.append("failed")
            elif index in self.retried:
                states.append("retried")
            elif all(d in self.done for d in task.dependencies):
                states.append("ready")
            else:
                states.append("waiting")
        return states

    @property
    def cost_gb_s(self) -> float:
        return self.task_cost_gb_s + self.startup_cost_gb_s


@dataclass
class Snapshot:
    """What one poll found: recent runs' summaries, runs in progress, ended reports."""

    summaries: list[dict[str, Any]]
    live: dict[str, LiveRun]
    polled_unix: float


class RunWatcher:
    """Follows the run history and the event streams of runs in progress."""

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, history: RunHistory, run_ttl_s: int
    ) -> None:
        self.client = client
        self.history = history
        self.run_ttl_s = run_ttl_s
        self.live: dict[str, LiveRun] = {}
        self._reports: dict[str, RunReport] = {}
        self._scripts = Scripts(client)

    def poll(self) -> Snapshot:
        """Read what changed since the last poll."""
        recent = self.history.recent(RECENT_RUNS)
        texts = self.history.summaries([run_id for run_id, _ in recent])
        summaries = [json.loads(t) for t in texts if t is not None]
        shown = {s["run_id"] for s in summaries}
        self._reports = {r: report for r, report in self._reports.items() if r in shown}
        running = [
            s["run_id"]
            for s in summaries
            if s.get("status") == RUNNING and self._store(s["run_id"]).phase() != "lost"
        ]
        for run_id in list(self.live):
            if run_id not in running:
                del self.live[run_id]
        new = [r for r in running if r not in self.live]
        for run_id, text in zip(new, self.history.load(new), strict=True):
            if text is not None:
                self.live[run_id] = LiveRun(RunReport.from_json(text))
        for run_id, run in self.live.items():
            run.cursor, batches = self._store(run_id).read_events(run.cursor, None)
            for batch in batches:
                run.apply(events.decode(batch))
        return Snapshot(summaries, dict(self.live), time.time())

    def _store(self, run_id: str) -> RunStore:
        return RunStore(self.client, run_id, self.run_ttl_s, self._scripts)

    def close(self) -> None:
        """Close the watcher's Redis connections (its browser tab was closed)."""
        self.client.close()

    def report(self, run_id: str) -> RunReport | None:
        """A run's saved report (cached once the run ended)."""
        if run_id in self._reports:
            return self._reports[run_id]
        (text,) = self.history.load([run_id])
        if text is None:
            return None
        found = RunReport.from_json(text)
        if found.status != RUNNING:
            self._reports[run_id] = found
        return found
