"""A Lambda invocation's lease, renewed from a child process forked when it starts.

A worker proves it is alive by renewing its invocation's lease in Redis. A thread in the
worker's interpreter cannot be trusted with that: a task that holds the GIL (a catastrophic
regex, a long native call that does not release it) stops every other thread, the lease
lapses and the client runs the work a second time. The local platform renews leases from
its dispatcher, outside the instance; Lambda has no such outside. So each invocation forks
a *lease watcher* when it takes its lease: a child process with an interpreter of its own
that renews the lease through Redis (``RunStore.renew_lease``, the same script the worker's
own heartbeat uses) until it is told to stop or its parent dies.

State of one watcher, seen from the worker (``ForkedLeases``):

* *holding* — a child runs; the worker holds the write end of its *stop* pipe and the read
  end of its *gone* pipe. The child sleeps in ``poll`` on the stop pipe for a third of a
  lease at a time (``HEARTBEATS_PER_LEASE``), then renews. It connects to Redis only when
  its first renewal is due, so an invocation shorter than that costs one fork and no
  connection.
* *run gone* — a renewal found the run's record gone (finished elsewhere, failed,
  cancelled): the child writes one byte on the gone pipe and exits; ``run_gone`` reads it
  and the branch loop stops before its next task.
* *stopped* — ``drop`` writes the stop byte and reaps the child, waiting at most
  ``_STOP_WAIT_S`` before killing it, so no watcher outlives its invocation (Lambda freezes
  an instance between invocations). A child whose parent died sees its stop pipe close (or
  its parent process change) and exits without another renewal.

Where no process can be forked (the instance is out of processes or memory), the lease
is renewed from a thread instead, as on other platforms.

Only ``os.fork`` and pipes: Lambda has no ``/dev/shm``, so ``multiprocessing`` queues and
semaphores are not available there. The child imports nothing, logs nothing and leaves with
``os._exit``, so locks another thread of the worker held at the fork cannot stop it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import time
from dataclasses import dataclass

import redis

from dask_serverless.constants import HEARTBEATS_PER_LEASE
from dask_serverless.protocol.store import Client, RunStore, Scripts, client_for
from dask_serverless.worker.handler import Heartbeat

_STOP = b"s"
_GONE = b"g"
# How long ``drop`` waits for a told watcher to exit before it kills it.
_STOP_WAIT_S = 1.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Watcher:
    pid: int
    run_id: str
    stop: int
    gone: int


class ForkedLeases:
    """Renews each invocation's lease from a forked child (see the module docstring).

    The worker's lease keeper on Lambda (``WorkerEnvironment(leases=…)``): ``hold`` at the
    invocation's start, ``drop`` at its end, ``run_gone`` between tasks.
    """

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._watcher: _Watcher | None = None
        self._gone_run: str | None = None
        # Renews from a thread, as a last resort, when no process can be forked.
        self._fallback = Heartbeat()

    @property
    def pid(self) -> int | None:
        """The running watcher's process id; None between invocations."""
        return None if self._watcher is None else self._watcher.pid

    def hold(self, store: RunStore, invocation_id: str, lease_ms: int) -> None:
        """Fork the watcher that renews ``invocation_id``'s lease until ``drop``."""
        self.drop()
        stop_read, stop_write = os.pipe()
        gone_read, gone_write = os.pipe()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as error:
            for end in (stop_read, stop_write, gone_read, gone_write):
                os.close(end)
            logger.warning("no lease watcher (%s): the lease is renewed from a thread", error)
            self._fallback.hold(store, invocation_id, lease_ms)
            return
        if pid == 0:
            status = 1
            try:
                os.close(stop_write)
                os.close(gone_read)
                watch_lease(
                    self._redis_url,
                    isinstance(store.client, redis.RedisCluster),
                    store.run_id,
                    store.ttl_s,
                    invocation_id,
                    lease_ms,
                    parent,
                    stop_read,
                    gone_write,
                )
                status = 0
            finally:
                os._exit(status)
        os.close(stop_read)
        os.close(gone_write)
        self._watcher = _Watcher(pid, store.run_id, stop_write, gone_read)

    def drop(self) -> None:
        """Stop the watcher and reap it: it does not outlive the invocation."""
        self._fallback.drop()
        watcher, self._watcher = self._watcher, None
        if watcher is None:
            return
        with contextlib.suppress(OSError):
            os.write(watcher.stop, _STOP)
        os.close(watcher.stop)
        # The child's end of the gone pipe closes when it exits.
        exited = _read_ready(watcher.gone, _STOP_WAIT_S)
        if exited and os.read(watcher.gone, 1) == _GONE:
            self._gone_run = watcher.run_id
        if not exited or not _reap(watcher.pid, _STOP_WAIT_S):
            with contextlib.suppress(ProcessLookupError):
                os.kill(watcher.pid, signal.SIGKILL)
            os.waitpid(watcher.pid, 0)
        os.close(watcher.gone)

    def run_gone(self, run_id: str) -> bool:
        """Whether a renewal found ``run_id``'s record gone (a poll, no Redis call)."""
        watcher = self._watcher
        if (
            watcher is not None
            and watcher.run_id == run_id
            and _read_ready(watcher.gone, 0)
            and os.read(watcher.gone, 1) == _GONE
        ):
            self._gone_run = run_id
        return self._gone_run == run_id or self._fallback.run_gone(run_id)


def watch_lease(
    redis_url: str,
    cluster: bool,
    run_id: str,
    ttl_s: int,
    invocation_id: str,
    lease_ms: int,
    parent: int,
    stop: int,
    gone: int,
) -> None:
    """The watcher's life in the child: renew every third of the lease until told to stop,
    the parent dies or the run is gone (then say so on ``gone``)."""
    # No finalizer of the parent's objects runs here (a Redis connection's would shut
    # down the socket the parent shares).
    gc.disable()
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, signal.SIG_DFL)
    interval = lease_ms / 1000 / HEARTBEATS_PER_LEASE
    client: Client | None = None
    renewing: RunStore | None = None
    while not _read_ready(stop, interval) and os.getppid() == parent:
        try:
            if renewing is None:
                client = client_for(redis_url, cluster)
                renewing = RunStore(client, run_id, ttl_s, Scripts(client))
            alive = renewing.renew_lease(invocation_id, lease_ms)
        except (redis.RedisError, redis.RedisClusterException):
            continue
        if not alive:
            os.write(gone, _GONE)
            return


def _read_ready(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` has a byte or its end-of-file within ``timeout_s``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _reap(pid: int, timeout_s: float) -> bool:
    """Collect the exited child ``pid``; False if it still runs after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > give_up:
            return False
        time.sleep(0.001)
    return True
