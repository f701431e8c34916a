"""One instance of the local platform: a process that serves one invocation at a time.

``instance_main`` is the local platform's entry point for a worker, as the Lambda handler
is AWS's: it holds the instance to its configuration (cgroup, native thread pools), builds
the ``WorkerEnvironment`` once, then hands every invocation the dispatcher sends down its
pipe to the worker (``worker.handler.serve``) with a Lambda-like context. Messages on the
pipe (instance → dispatcher): ``(READY,)`` after booting and after every invocation,
``(INVOKE, [invocation, …])`` to start more workers. Dispatcher → instance: an
``Invocation``, or None to stop.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from dask_serverless.backends.local.resources import InstanceGroup, TaskSlot, limit_native_threads
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.worker.handler import WorkerEnvironment, serve

READY = "ready"
INVOKE = "invoke"
FUNCTION_NAME = "dask-serverless-local"


@dataclass(frozen=True)
class InstanceSettings:
    """What a new instance is started with (passed over a pipe: never in argv or env)."""

    redis_url: str
    secret: bytes
    invocation_timeout_ms: int
    memory_mb: int
    # Builds the instance's environment instead of the default one (a picklable callable;
    # the local Lambda endpoint's instances fan out through its HTTP API with it).
    worker_environment: Callable[[], WorkerEnvironment] | None = None
    # The instance's cgroup (its configuration's limits) and where it notes its task.
    cgroup: InstanceGroup | None = None
    task_slot: TaskSlot | None = None


@dataclass
class LocalContext:
    """The subset of Lambda's context object that workers use."""

    function_name: str
    memory_limit_in_mb: int
    aws_request_id: str
    deadline: float
    cold_start: bool

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


class PipeInvoker:
    """A worker's way to invoke more workers: send the payloads to the dispatcher."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def invoke(self, invocations: Sequence[Invocation]) -> None:
        if invocations:
            self._connection.send((INVOKE, list(invocations)))


def instance_main(settings: InstanceSettings, connection: Connection) -> None:
    """The life of one instance: serve invocations until told to stop."""
    if settings.cgroup is not None:
        settings.cgroup.enter()
    if settings.memory_mb:
        limit_native_threads(settings.memory_mb, os.cpu_count() or 1)
    if settings.worker_environment is not None:
        environment = settings.worker_environment()
    else:
        environment = WorkerEnvironment(
            settings.redis_url,
            settings.secret,
            PipeInvoker(connection),
            worker_id=f"local:{os.getpid()}",
        )
    if settings.task_slot is not None:
        environment.on_task = settings.task_slot.note
    probe = settings.cgroup.memory_probe() if settings.cgroup is not None else None
    if probe is not None:
        environment.memory_probe = probe
    cold = True
    while True:
        connection.send((READY,))
        try:
            invocation = connection.recv()
        except EOFError:
            return
        if invocation is None:
            return
        context = LocalContext(
            function_name=FUNCTION_NAME,
            memory_limit_in_mb=settings.memory_mb,
            aws_request_id=secrets.token_hex(8),
            deadline=time.monotonic() + settings.invocation_timeout_ms / 1000,
            cold_start=cold,
        )
        cold = False
        try:
            serve(environment, invocation, context)
        except Exception:
            # What a platform does with a crashed invocation: log it and keep the instance.
            traceback.print_exc(file=sys.stderr)
