"""A local serverless platform: the embedded default's pool of worker processes.

It behaves like AWS Lambda's asynchronous invocation model, so that what works here works
there:

* ``invoke`` is fire-and-forget: invocations join the platform's queue and the caller returns
  at once. Workers invoke further workers the same way, by sending invocations to the
  dispatcher (the platform's API) over their own pipe.
* an *instance* is a process that handles one invocation at a time. The dispatcher hands a
  queued invocation to an idle instance (a *warm* start) or, when none is idle and fewer
  than ``concurrency`` instances live, starts a new one (a *cold* start); otherwise the
  invocation waits in the queue, as Lambda queues asynchronous invocations beyond its
  concurrency. Queued invocations start in the order they arrived, whatever their
  configuration. An instance idle for ``keep_alive`` seconds is reaped.
* ``deliveries=2`` delivers every invocation twice, as Lambda's at-least-once delivery may:
  the worker protocol must (and does) give the same result with nothing counted twice.

Every instance talks to the dispatcher over a pipe of its own — never through a queue
shared with other instances — so an instance killed at any moment (``SIGKILL``, out of
memory) takes nothing down with it; the dispatcher sees its pipe close and forgets it.
Recovering the invocation it was running is the worker protocol's business (leases), as on
a real platform; the dispatcher tells the client at once which invocation died and how
(``take_crashes``: exit code, signal, out of memory), so the client need not wait for the
lease to lapse. ``cancel`` ends every instance that runs a task of a cancelled run (it is
replaced by a fresh one on demand) and drops the run's queued invocations, within a
dispatcher tick.

Instances are per *configuration* (memory MB), as Lambda functions are per memory size:
an invocation may ask for a ``memory_mb``, and runs only in an instance of that
configuration (the default configuration otherwise). Where Linux cgroups are writable each
instance is held to its configuration — ``m / 1769`` CPUs and ``m`` MB, see
``backends.local.resources`` — and an instance the kernel kills for exceeding its memory is
reported as the out-of-memory kill of the task it was running (the client retries the
task one size up). Elsewhere instances run
unthrottled (``throttled`` is False) after one warning. At the concurrency limit an idle
instance of another configuration makes room for one that is needed.

New instances are forked from the platform's own fork server (``backends.local.forkserver``)
that has already imported the worker (and the scientific stack the client has loaded), so
even a cold start imports nothing heavy and a warm one imports nothing at all. The server
is a fresh interpreter, never the user's program: scripts without an
``if __name__ == "__main__":`` guard, ``python -``, ``python -c``, IPython, notebooks and
pytest all work, as with dask's threaded scheduler.

A task that waits for a nested run (``dask_serverless.get`` called inside a task) secedes
from the platform, as ``distributed.secede`` does: while it waits, its instance does not
count against ``concurrency``, so the child run's invocations always find room.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import Any

import redis

from dask_serverless import logs
from dask_serverless.backends.local.forkserver import InstanceProcess, shared_fork_server
from dask_serverless.backends.local.instance import (
    CANCEL,
    FAILED,
    INVOKE,
    PREWARM,
    READY,
    REJOIN,
    SECEDE,
    InstanceSettings,
)
from dask_serverless.backends.local.queue import InvocationQueue
from dask_serverless.backends.local.resources import (
    Cgroups,
    InstanceGroup,
    TaskSlot,
)
from dask_serverless.constants import (
    DEFAULT_MEMORY_MB,
    HEARTBEATS_PER_LEASE,
    INVOCATION_TIMEOUT_MS,
    NESTED_CANCEL_LEASES,
)
from dask_serverless.protocol import events
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.store import RunStore, Scripts, client_for
from dask_serverless.worker.handler import WorkerEnvironment

_TICK_S = 0.1
_MAX_FAILED_BOOTS = 3
# Crashed invocations and cancelled runs remembered, at most (oldest forgotten first).
_REMEMBERED = 1024

logger = logging.getLogger(__name__)


def _cause_of_death(instance: Instance) -> str:
    """How an instance ended, as its exit status and its cgroup tell."""
    instance.process.join(timeout=1)
    if instance.group is not None and instance.group.oom_kills():
        return f"out of memory: killed above its {instance.memory_mb} MB configuration"
    code = instance.process.exitcode
    if code is None:
        return "the instance stopped answering"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"the instance exited with code {code}"


@dataclass
class Instance:
    """The dispatcher's view of one instance."""

    process: InstanceProcess
    connection: Connection
    booted: bool = False
    # Waiting for a nested run: not counted against the concurrency.
    seceded: bool = False
    # A cancelled run's task waiting for a nested run: (run, when to end it regardless).
    end_by: tuple[str, float] | None = None
    invocation: Invocation | None = None
    idle_since: float = field(default_factory=time.monotonic)
    memory_mb: int = 0
    group: InstanceGroup | None = None
    slot: TaskSlot | None = None
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    served: bool = False
    # When the lease keeper last renewed the lease of the invocation it runs.
    renewed_at: float = field(default_factory=time.monotonic)

    @property
    def idle(self) -> bool:
        return self.booted and self.invocation is None


class LocalBackend:
    """See the module docstring. Thread-safe; owned by one Scheduler."""

    name = "local"

    def __init__(
        self,
        redis_url: str,
        secret: bytes,
        concurrency: int | None = None,
        keep_alive_s: float = 60.0,
        invocation_timeout_ms: int = INVOCATION_TIMEOUT_MS,
        memory_mb: int = DEFAULT_MEMORY_MB,
        deliveries: int = 1,
        worker_environment: Callable[[], WorkerEnvironment] | None = None,
        enforce_resources: bool = True,
    ) -> None:
        self.concurrency = int(concurrency or os.cpu_count() or 1)
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.deliveries = int(deliveries)
        self.keep_alive_s = float(keep_alive_s)
        self._settings = InstanceSettings(
            redis_url,
            secret,
            int(invocation_timeout_ms),
            int(memory_mb),
            worker_environment,
            concurrency=self.concurrency,
            logging=logs.logging_config(),
        )
        # Started now, so that its imports overlap with the client's first compute.
        shared_fork_server()
        self.cold_starts = 0
        # Why the platform stopped serving invocations, if it did; clients raise it.
        self.failure: BaseException | None = None
        self._failed_boots = 0
        self._boot_error = ""
        self.lost_instances = 0
        self.out_of_memory = 0
        self._queue = InvocationQueue(int(memory_mb))
        self._cgroups, self.throttled = self._resources(enforce_resources)
        self._retired: list[Instance] = []
        # The Redis client that reports out-of-memory kills, made on the first one.
        self._reporter: Any = None
        self._instances: dict[Connection, Instance] = {}
        # Invocation id → (run id, cause) of instances that died running it; cancelled runs.
        self._crashes: dict[str, tuple[str, str]] = {}
        self._cancelled: dict[str, None] = {}
        self._lock = threading.Lock()
        self._wake_reader, self._wake_writer = multiprocessing.connection.Pipe(duplex=False)
        self._closed = threading.Event()
        self._dispatcher = threading.Thread(
            target=self._dispatch_forever, name="dask-serverless-local-dispatcher", daemon=True
        )
        self._dispatcher.start()
        self._lease_keeper: threading.Thread | None = None
        if redis_url:
            self._lease_keeper = threading.Thread(
                target=self._keep_leases, name="dask-serverless-local-leases", daemon=True
            )
            self._lease_keeper.start()

    # -- the platform's API ------------------------------------------------------------

    def invoke(self, invocations: Sequence[Invocation]) -> None:
        if self._closed.is_set():
            raise RuntimeError("the local backend is closed")
        with self._lock:
            self._enqueue(invocations)
            # An idle instance gets its invocation now, from this thread: a warm start
            # does not wait for the dispatcher thread to wake. Instances to start are the
            # dispatcher's.
            self._assign(cold_starts=False)
        self._wake_writer.send_bytes(b"!")

    def take_crashes(self, run_id: str) -> dict[str, str]:
        """Invocations of ``run_id`` whose instance died since the last call, with why."""
        with self._lock:
            taken = {i: cause for i, (run, cause) in self._crashes.items() if run == run_id}
            for invocation_id in taken:
                del self._crashes[invocation_id]
        return taken

    def cancel(self, run_id: str) -> None:
        """End the instances running ``run_id``'s tasks and drop its queued invocations."""
        with self._lock:
            self._end_run(run_id)

    def _end_run(self, run_id: str) -> None:
        self._cancelled[run_id] = None
        while len(self._cancelled) > _REMEMBERED:
            del self._cancelled[next(iter(self._cancelled))]
        self._queue.drop_run(run_id)
        now = time.monotonic()
        for instance in self._instances.values():
            if instance.invocation is not None and instance.invocation.run_id == run_id:
                if instance.seceded:
                    # Its task waits for a nested run, whose client notices the parent
                    # run gone and deletes the nested run's keys: give it the time that
                    # takes, then end the instance if it is still at it.
                    grace_s = NESTED_CANCEL_LEASES * instance.invocation.lease_ms / 1000
                    instance.end_by = (run_id, now + grace_s)
                else:
                    with contextlib.suppress(OSError):
                        instance.process.kill()

    def prewarm(self, counts: Mapping[int, int]) -> None:
        """Start ``counts[MB]`` instances of each configuration now (pre-warming), as far
        as the concurrency allows: the next invocations of that size take them."""
        with self._lock:
            self._start_ahead(counts)
        self._wake_writer.send_bytes(b"!")

    def warm_instances(self) -> dict[int, int]:
        """Booted instances per configuration (MB): what a run starting now finds warm —
        idle ones, and those still ending an invocation (the instance that ran the last
        run's sink tells the dispatcher it is free only after the client has the result)."""
        with self._lock:
            counts: dict[int, int] = {}
            for instance in self._instances.values():
                if instance.booted and not instance.seceded:
                    counts[instance.memory_mb] = counts.get(instance.memory_mb, 0) + 1
            return counts

    def live_instances(self) -> int:
        with self._lock:
            return len(self._instances)

    def instance_pids(self) -> list[int]:
        """Process ids of the live instances (fault-injection tests kill some)."""
        with self._lock:
            return [instance.process.pid for instance in self._instances.values()]

    # -- the dispatcher thread ---------------------------------------------------------

    def _enqueue(self, invocations: Sequence[Invocation]) -> None:
        for invocation in invocations:
            if invocation.run_id not in self._cancelled:
                self._queue.extend([invocation] * self.deliveries)

    def _dispatch_forever(self) -> None:
        """Serve invocations until closed; a failure is kept for clients to raise."""
        try:
            self._dispatch()
        except Exception as error:
            self.failure = error
            traceback.print_exc(file=sys.stderr)

    def _dispatch(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                connections = [self._wake_reader, *self._instances]
            for connection in wait(connections, timeout=_TICK_S):
                if connection is self._wake_reader:
                    self._wake_reader.recv_bytes()
                else:
                    self._receive(connection)  # type: ignore[arg-type]
            with self._lock:
                if not self._closed.is_set():
                    self._assign()
                    self._reap()

    def _receive(self, connection: Connection) -> None:
        try:
            message = connection.recv()
        except Exception:  # closed, or cut mid-message by a kill: the instance is gone
            self._forget(connection)
            return
        with self._lock:
            instance = self._instances.get(connection)
            if instance is None:
                return
            if message[0] == INVOKE:
                self._enqueue(message[1])
            elif message[0] == READY:
                self._failed_boots = 0
                if instance.ready_at is None:
                    instance.ready_at = time.time()
                instance.booted = True
                instance.invocation = None
                instance.idle_since = time.monotonic()
            elif message[0] == PREWARM:
                self._start_ahead(message[1])
            elif message[0] == SECEDE:
                instance.seceded = True
            elif message[0] == REJOIN:
                instance.seceded = False
            elif message[0] == CANCEL:
                self._end_run(message[1])
            elif message[0] == FAILED:
                self._boot_error = str(message[1])
                logger.error("a worker instance failed to start:\n%s", self._boot_error)

    def _forget(self, connection: Connection) -> None:
        """An instance died (killed, out of memory) — drop it and retry its invocation.

        Like Lambda's retry of a failed asynchronous invocation: the same payload is
        delivered again. If the dead worker had already started it, the redelivery is a
        duplicate the worker protocol drops, and the invocation's lease recovers its work.
        An instance killed for exceeding its memory fails the task it was running instead.
        """
        with self._lock:
            dying = self._instances.get(connection)
        if dying is not None and dying.invocation is not None and dying.group is not None:
            dying.process.join(timeout=1)
            self._report_out_of_memory(dying)
        cause = _cause_of_death(dying) if dying is not None else ""
        with self._lock:
            instance = self._instances.pop(connection, None)
            lost = instance.invocation if instance is not None else None
            if instance is not None and lost is not None and lost.run_id in self._cancelled:
                instance.invocation = lost = None
            if lost is not None:
                self._crashes[lost.invocation_id] = (lost.run_id, cause)
                while len(self._crashes) > _REMEMBERED:
                    del self._crashes[next(iter(self._crashes))]
            if instance is not None and not instance.booted:
                self._failed_boots += 1
                if self._failed_boots >= _MAX_FAILED_BOOTS:
                    said = self._boot_error.strip() or "nothing (see the process's stderr)"
                    self.failure = RuntimeError(
                        f"{self._failed_boots} worker instances in a row exited before they "
                        f"started; the last one said: {said}"
                    )
            if instance is not None and instance.invocation is not None:
                logger.warning(
                    "instance %d died running invocation %s; delivering it again",
                    instance.process.pid,
                    instance.invocation.invocation_id,
                )
                self.lost_instances += 1
                self._queue.appendleft(instance.invocation)
        connection.close()
        if instance is not None:
            instance.process.join(timeout=1)
            self._release(instance)

    def _assign(self, cold_starts: bool = True) -> None:
        """Start queued invocations in the order they arrived, as Lambda does across its
        functions: each on an idle instance of its configuration (warm), on a new instance
        while fewer than ``concurrency`` live (cold), or on a new one that replaces an idle
        instance of another configuration; an instance already booting for its
        configuration takes the next one. The rest wait. Without ``cold_starts``, the
        first invocation that no idle instance takes ends the pass."""
        if self.failure is not None:
            return
        idle: dict[int, list[Instance]] = {}
        booting: dict[int, int] = {}
        for instance in self._instances.values():
            if instance.idle:
                idle.setdefault(instance.memory_mb, []).append(instance)
            elif not instance.booted:
                booting[instance.memory_mb] = booting.get(instance.memory_mb, 0) + 1
        # Each invocation looked at takes an idle or booting instance or a slot, or ends
        # the pass: no more than this many can be looked at usefully.
        useful = 2 * len(self._instances) + self.concurrency + 1
        for number, queued in self._queue.oldest(useful):
            memory_mb = self._queue.memory_of(queued)
            if idle.get(memory_mb):
                self._hand_over(idle[memory_mb].pop(), number, queued)
            elif not cold_starts:
                return
            elif booting.get(memory_mb):
                booting[memory_mb] -= 1
            elif self._counted() < self.concurrency or self._evict_idle(idle):
                try:
                    self._start_instance(memory_mb)
                except Exception:
                    # This configuration cannot start (a cgroup refused it): its queued
                    # invocations fail, as a platform fails invocations it cannot place;
                    # the dispatcher goes on serving every other configuration.
                    logger.exception("cannot start an instance of %d MB", memory_mb)
                    self._queue.drop_memory(memory_mb)
                    return
            else:
                return

    def _hand_over(self, instance: Instance, number: int, queued: Invocation) -> None:
        # Start-up as Lambda reports it: a cold start's boot (from the instance's start
        # to ready, not the time it then waited for work) plus the hand-over; never the
        # time spent queued behind the concurrency limit.
        boot = 0.0
        if not instance.served and instance.ready_at is not None:
            boot = instance.ready_at - instance.started_at
        invocation = replace(queued, sent_at=time.time(), boot_s=round(boot, 6))
        try:
            instance.connection.send(invocation)
        except (BrokenPipeError, OSError):
            return
        self._queue.remove(number)
        instance.served = True
        instance.invocation = invocation

    def _start_ahead(self, counts: Mapping[int, int]) -> None:
        for memory_mb, count in counts.items():
            for _ in range(count):
                if self._counted() >= self.concurrency:
                    return
                self._start_instance(int(memory_mb))

    def _counted(self) -> int:
        """Instances that count against the concurrency: all but the seceded ones."""
        return sum(1 for instance in self._instances.values() if not instance.seceded)

    def _evict_idle(self, idle: dict[int, list[Instance]]) -> bool:
        """Stop one idle instance (one nothing queued ahead could use) to make room."""
        for instances in idle.values():
            if instances:
                instance = instances.pop()
                del self._instances[instance.connection]
                self._stop(instance)
                self._retired.append(instance)
                return True
        return False

    def _start_instance(self, memory_mb: int) -> None:
        group = self._cgroups.create(memory_mb) if self._cgroups is not None else None
        slot = TaskSlot() if group is not None else None
        parent_end, child_end = multiprocessing.connection.Pipe(duplex=True)
        # The settings wait in the pipe; the secret never passes through the fork server.
        parent_end.send(replace(self._settings, memory_mb=memory_mb, cgroup=group))
        fds = [child_end.fileno()] if slot is None else [child_end.fileno(), slot.fd]
        try:
            process = shared_fork_server().fork(fds)
        except BaseException:
            parent_end.close()
            if slot is not None:
                slot.close()
            if group is not None and self._cgroups is not None:
                self._cgroups.remove(group)
            raise
        finally:
            child_end.close()
        self._instances[parent_end] = Instance(
            process, parent_end, memory_mb=memory_mb, group=group, slot=slot
        )
        self.cold_starts += 1
        logger.debug("cold start: instance %d (%d MB)", process.pid, memory_mb)

    def _reap(self) -> None:
        now = time.monotonic()
        for instance in self._instances.values():
            if instance.end_by is None:
                continue
            run_id, end_at = instance.end_by
            running = instance.invocation is not None and instance.invocation.run_id == run_id
            if not running:
                instance.end_by = None
            elif now >= end_at:
                with contextlib.suppress(OSError):
                    instance.process.kill()
        for connection, instance in list(self._instances.items()):
            if instance.idle and now - instance.idle_since > self.keep_alive_s:
                del self._instances[connection]
                self._stop(instance)
                self._retired.append(instance)
        for instance in [i for i in self._retired if not i.process.is_alive()]:
            self._retired.remove(instance)
            self._release(instance)

    # -- leases renewed from outside the instance --------------------------------------

    def _keep_leases(self) -> None:
        """Renew the lease of every running invocation from here, not from the instance
        (whose interpreter a task may hold); ZADD XX never revives a released lease."""
        client = client_for(self._settings.redis_url)
        scripts: Scripts | None = None
        try:
            while not self._closed.wait(_TICK_S):
                now = time.monotonic()
                with self._lock:
                    due = [
                        i.invocation
                        for i in self._instances.values()
                        if i.invocation is not None
                        and now - i.renewed_at
                        >= i.invocation.lease_ms / 1000 / HEARTBEATS_PER_LEASE
                    ]
                    for instance in self._instances.values():
                        if instance.invocation in due:
                            instance.renewed_at = now
                for invocation in due:
                    assert invocation is not None
                    with contextlib.suppress(redis.RedisError):
                        scripts = scripts or Scripts(client)
                        RunStore(client, invocation.run_id, invocation.ttl_s, scripts).renew_lease(
                            invocation.invocation_id, invocation.lease_ms
                        )
        finally:
            client.close()

    # -- configurations: cgroups, out-of-memory reports ---------------------------------

    @staticmethod
    def _resources(enforce: bool) -> tuple[Cgroups | None, bool]:
        if not enforce:
            return None, False
        cgroups, reason = Cgroups.detect()
        if cgroups is None:
            warnings.warn(
                f"dask-serverless local backend runs unthrottled: {reason}; memory "
                "configurations get neither their CPU share nor their memory limit",
                RuntimeWarning,
                stacklevel=3,
            )
        return cgroups, cgroups is not None

    def _release(self, instance: Instance) -> None:
        """Remove a finished instance's cgroup and task slot; stop watching its process."""
        if instance.group is not None and self._cgroups is not None:
            instance.process.join(timeout=1)
            self._cgroups.remove(instance.group)
        if instance.slot is not None:
            instance.slot.close()
            instance.slot = None
        instance.process.close()

    def _report_out_of_memory(self, instance: Instance) -> None:
        """If the kernel killed ``instance`` for its memory, report the task it ran.

        An ``oom`` event in the run's stream: the client retries the task one size up
        (the invocation's lease recovers it) or, at the largest size, fails the run with
        ``TaskOutOfMemoryError``.
        """
        assert instance.group is not None and instance.invocation is not None
        if instance.group.oom_kills() == 0 or instance.slot is None:
            return
        running = instance.slot.read()
        if running is None or running[0] != instance.invocation.run_id:
            return
        run_id, ttl, index, key = running
        self.out_of_memory += 1
        logger.warning(
            "task %s ran out of its %d MB: its instance was killed", key, instance.memory_mb
        )
        if self._reporter is None:
            self._reporter = client_for(self._settings.redis_url)
        with contextlib.suppress(Exception):
            RunStore(self._reporter, run_id, ttl).append_events(
                events.encode([events.out_of_memory(index, instance.memory_mb)])
            )

    @staticmethod
    def _stop(instance: Instance) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            instance.connection.send(None)
        instance.connection.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake_writer.send_bytes(b"!")
        self._dispatcher.join(timeout=5)
        if self._lease_keeper is not None:
            self._lease_keeper.join(timeout=5)
        with self._lock:
            instances = list(self._instances.values())
            self._instances.clear()
            self._queue.clear()
        for instance in instances:
            self._stop(instance)
        deadline = time.monotonic() + 5
        for instance in instances:
            instance.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if instance.process.is_alive():
                instance.process.kill()
                instance.process.join()
        for instance in [*instances, *self._retired]:
            self._release(instance)
        if self._cgroups is not None:
            self._cgroups.close()
        if self._reporter is not None:
            self._reporter.close()
        self._wake_reader.close()
        self._wake_writer.close()
