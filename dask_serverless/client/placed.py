"""The tasks a run places in the client: run here, by the workers' own code.

When the planner places tasks beside the literal data they read
(``planning.locality``), the client runs them itself, as one invocation of the run,
through the same ``worker.handler.serve`` a serverless instance and the inline backend
use: the invocation is claimed and leased, each task's output is published, fan-in
children are counted and claimed in Redis, events reach the run's stream — so callbacks,
warnings, errors, retries, metrics and the run report treat these tasks like any other,
with the client's worker id (``CLIENT_WORKER``) as their instance.

Three things differ from a serverless worker (``ClientLogic``): the children that are not
placed in the client always go to new invocations on the platform, so the rest of the
DAG runs on the workers; nothing is handed on, since the data is here; and when the sink
is placed too (all its inputs are), the client, which reaches it like the sink's worker
and finishes the run the same way (``worker.loop.finish_run``: seal, delete the run's
keys, announce the end; no worker is invoked), is also the result's reader: it keeps the
values and stores only their places (``None`` each), so a persisted array computed
whole never makes a round trip through Redis (nor meets ``max-output-bytes``). The client's
copy of the run record still holds the literal data (the stored one does not), and is
forgotten when the invocation ends.

A ``ClientWorkers`` keeps the environments (a Redis connection, a heartbeat) of a
Scheduler's client-side invocations between runs, one per compute running at once.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import replace
from typing import Any

from dask_serverless.backends.base import Backend
from dask_serverless.constants import CLIENT_WORKER, DEFAULT_MEMORY_MB
from dask_serverless.graph import DAG
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.record import RunRecord
from dask_serverless.worker.branch import Branch
from dask_serverless.worker.handler import WorkerEnvironment, serve
from dask_serverless.worker.loop import WorkerLogic, finish_run


class ClientContext:
    """What the client's invocations tell the worker code of their platform: one vCPU (a
    thread of the client), so history learns their times at ``DEFAULT_MEMORY_MB`` — the
    size placement predicts them at (``planning.locality``) — and no time limit."""

    memory_limit_in_mb = DEFAULT_MEMORY_MB


_ONE_VCPU = ClientContext()


class ClientLogic(WorkerLogic):
    """The branch loop's stages for tasks placed in the client (see module docstring)."""

    def __init__(self, placed: frozenset[int]) -> None:
        self.placed = placed
        # The requested values, once this invocation reached the sink.
        self.result: tuple[Any, ...] | None = None

    def split(self, branch: Branch, index: int, ready: list[int]) -> tuple[list[int], list[int]]:
        """Placed children continue here; every other child goes to the platform."""
        return [c for c in ready if c in self.placed], [c for c in ready if c not in self.placed]

    def share(self, branch: Branch, stack: list[int]) -> list[int]:
        """Nothing: the placed tasks' data is here, and only here."""
        return []

    def hand_off_due(self, branch: Branch) -> bool:
        """Never: the client has no platform time limit."""
        return False

    def finish(self, branch: Branch, inputs: dict[int, Any]) -> None:
        """End the run as the sink's worker does, keeping the values here: the stored
        result holds ``None`` in their places."""
        self.result = tuple(inputs[i] for i in branch.dag.requested)
        finish_run(branch, dict.fromkeys(inputs))


class ClientWorkers:
    """Worker environments for client-side invocations, one per compute in progress."""

    def __init__(self, redis_url: str, secret: bytes, backend: Backend) -> None:
        self._redis_url = redis_url
        self._secret = secret
        self._backend = backend
        self._lock = threading.Lock()
        self._idle: list[WorkerEnvironment] = []
        self._all: list[WorkerEnvironment] = []

    def serve(
        self, record: RunRecord, dag: DAG, invocation: Invocation, placed: frozenset[int]
    ) -> tuple[Any, ...] | None:
        """Run ``invocation`` of ``record``'s run here: the ``placed`` tasks. ``dag`` is
        the run's DAG with its literal data (the stored record's placed nodes are empty).

        Returns the requested values when the invocation finished the run (the sink was
        placed), else None.
        """
        environment = self._take()
        logic = ClientLogic(placed)
        try:
            environment.logic = logic
            environment.remember(replace(record, dag=dag))
            serve(environment, invocation, _ONE_VCPU)
            return logic.result
        finally:
            environment.records.pop(record.run_id, None)
            with self._lock:
                self._idle.append(environment)

    def _take(self) -> WorkerEnvironment:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        worker_id = f"{CLIENT_WORKER}:{socket.gethostname()}:{os.getpid()}"
        environment = WorkerEnvironment(
            self._redis_url, self._secret, self._backend, worker_id=worker_id, cache_bytes=0
        )
        with self._lock:
            self._all.append(environment)
        return environment

    def close(self) -> None:
        with self._lock:
            environments, self._all, self._idle = self._all, [], []
        for environment in environments:
            environment.redis.close()
