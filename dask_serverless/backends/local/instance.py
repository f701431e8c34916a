"""One instance of the local platform: a process that serves one invocation at a time.

``run_instance`` is the local platform's entry point for a worker, as the Lambda handler
is AWS's. The fork server (``backends.local.forkserver``) calls it in a fresh fork with the
instance's descriptors: its pipe to the dispatcher and, under cgroups, its task slot. It
reads its ``InstanceSettings`` from the pipe, holds itself to its configuration (cgroup,
native thread pools), builds the ``WorkerEnvironment`` once, then hands every invocation
the dispatcher sends down the pipe to the worker (``worker.handler.serve``) with a
Lambda-like context.

Messages on the pipe, instance → dispatcher: ``(READY,)`` after booting and after every
invocation; ``(FAILED, traceback)`` when booting failed; ``(INVOKE, [invocation, …])`` to
start more workers; ``(SECEDE,)`` / ``(REJOIN,)`` around a task's wait for a nested run,
during which the instance does not count against the platform's concurrency. Dispatcher →
instance: the settings first, then an ``Invocation`` at a time, or None to stop.

The dispatcher's end closing means the platform is gone (its client exited): the instance
exits quietly, whatever it was doing, as nobody is left to hear from it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from dask_serverless import logs
from dask_serverless.backends.local.resources import InstanceGroup, TaskSlot, limit_native_threads
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.worker.handler import WorkerEnvironment, serve

READY = "ready"
FAILED = "failed"
INVOKE = "invoke"
SECEDE = "secede"
REJOIN = "rejoin"
PREWARM = "prewarm"
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
    # The instance's cgroup (its configuration's limits); its task slot comes as a descriptor.
    cgroup: InstanceGroup | None = None
    # The platform's concurrency, for nested runs started by this instance's tasks.
    concurrency: int | None = None
    # The client's dask ``logging`` config, applied in the instance (dask_serverless.logs).
    logging: dict | None = None


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


class DispatcherGone(Exception):
    """The dispatcher's end of the pipe closed: the platform is gone."""


class InstancePlatform:
    """The platform as a worker in this instance sees it: the pipe to the dispatcher.

    It invokes more workers (the worker's invoker), and is a complete ``Backend`` for a
    nested run started by a task (``dask_serverless.get`` inside a task): the child run's
    invocations join the same platform's queue, and while the task waits for them the
    instance secedes, so that the concurrency limit cannot deadlock.
    """

    name = "local"
    failure: BaseException | None = None

    def __init__(self, connection: Connection, concurrency: int | None, throttled: bool) -> None:
        self._connection = connection
        self.concurrency = concurrency
        self.throttled = throttled

    def invoke(self, invocations: Sequence[Invocation]) -> None:
        if invocations:
            self._send((INVOKE, list(invocations)))

    def warm_instances(self) -> Mapping[int, int]:
        """Unknown inside an instance: only the dispatcher sees the platform's instances."""
        return {}

    def prewarm(self, counts: Mapping[int, int]) -> None:
        """Ask the dispatcher to start instances ahead of a nested run's invocations."""
        if counts:
            self._send((PREWARM, dict(counts)))

    @contextlib.contextmanager
    def seceded(self) -> Iterator[None]:
        """Not count against the concurrency while the block waits (a nested run)."""
        self._send((SECEDE,))
        try:
            yield
        finally:
            self._send((REJOIN,))

    def _send(self, message: tuple) -> None:
        try:
            self._connection.send(message)
        except OSError as error:
            raise DispatcherGone() from error

    def close(self) -> None:
        """Nothing to release: the instance's pipe lives as long as the instance."""


def run_instance(fds: Sequence[int]) -> int:
    """The life of one instance on its descriptors; returns its exit status."""
    connection = Connection(fds[0])
    slot = TaskSlot(fds[1]) if len(fds) > 1 else None
    try:
        settings = connection.recv()
        platform = InstancePlatform(
            connection, settings.concurrency, throttled=settings.cgroup is not None
        )
    except (EOFError, OSError):
        return 0
    try:
        environment = boot(settings, platform, slot)
    except Exception:
        with contextlib.suppress(OSError):
            connection.send((FAILED, traceback.format_exc()))
        return 1
    # The platform went away (its pipe closed): nobody is left to report to.
    with contextlib.suppress(EOFError, OSError, DispatcherGone):
        serve_invocations(settings, environment, connection)
    return 0


def boot(
    settings: InstanceSettings, platform: InstancePlatform, slot: TaskSlot | None
) -> WorkerEnvironment:
    """Hold the instance to its configuration; build its worker environment."""
    logs.configure(settings.logging or {})
    if settings.cgroup is not None:
        settings.cgroup.enter()
    if settings.memory_mb:
        limit_native_threads(settings.memory_mb, os.cpu_count() or 1)
    if settings.worker_environment is not None:
        environment = settings.worker_environment()
    else:
        environment = WorkerEnvironment(
            settings.redis_url, settings.secret, platform, worker_id=f"local:{os.getpid()}"
        )
    if slot is not None:
        environment.on_task = slot.note
    probe = settings.cgroup.memory_probe() if settings.cgroup is not None else None
    if probe is not None:
        environment.memory_probe = probe
    return environment


def serve_invocations(
    settings: InstanceSettings, environment: WorkerEnvironment, connection: Connection
) -> None:
    """Serve invocations until told to stop; a closed pipe raises (the platform is gone)."""
    cold = True
    while True:
        connection.send((READY,))
        invocation = connection.recv()
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
        except DispatcherGone:
            raise
        except Exception:
            # What a platform does with a crashed invocation: log it and keep the instance.
            traceback.print_exc(file=sys.stderr)
