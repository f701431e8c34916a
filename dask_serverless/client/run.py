"""One run on the client side: from the stored record to the values of the requested keys.

A ``Run`` holds everything one ``compute`` needs — the DAG, its bundling and plan, the
run record, the run's store, its progress — and walks the run through its states:

1. ``submit``: store the signed record (the run is alive from now on) together with the
   count of the invocations about to start, then invoke one worker per bundle or root;
2. ``wait``: only listen (I-2). Progress drives the dask callbacks, an error event raises
   the task's own exception, ``finished`` means the sink's worker stored the result and
   deleted every intermediate key. While it waits it also *watches*: an invocation whose
   lease lapsed (its worker died) is re-invoked from its restart point, and a Redis that
   lost the run (restarted) is a clear error — so is a run nobody works on any more: no
   lease held and no invocation queued for a whole lease, or, after a Redis Cluster
   failover (the masters changed), no lease held and no progress for ``_STALL_LEASES``
   leases (the queue count itself may be a lost write then). Writes a failed master
   acknowledged but never replicated, such as a parent's mark in a fan-in inbox, leave
   such a run; it fails with that reason instead of waiting for its timeout;
3. ``take_result`` reads and deletes the result — or, when the run failed, timed out or
   was interrupted, ``purge`` deletes every key the run may have written (the record
   first, which stops every worker from writing again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from dask_serverless.backends.base import Backend
from dask_serverless.backends.local.resources import TaskOutOfMemoryError
from dask_serverless.client.progress import RunProgress
from dask_serverless.client.tracebacks import SourceIndex, with_sources
from dask_serverless.constants import WATCHES_PER_LEASE
from dask_serverless.graph import DAG
from dask_serverless.planning import Plan
from dask_serverless.planning.bundling import Bundling
from dask_serverless.protocol import events
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.record import ERROR, RESULT, RunRecord
from dask_serverless.protocol.store import RunStore
from dask_serverless.storage.serialize import Signer

_T = TypeVar("_T")
# Longest single wait on the event stream while following it.
_POLL_MS = 1000
# Pause after a batch of events while following, so batches are not read one event at a
# time (at most a tenth of the time the run has taken so far).
_BATCH_PAUSE_S = 0.02
# Attempts, doubling from 0.2 s, before a lost Redis connection fails the run.
_REDIS_RETRIES = 6
# What a short outage or a Redis Cluster failover raises.
_OUTAGES = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
)
# Leases without a running worker or any progress after which a run that saw a Redis
# Cluster failover counts as stalled (its queued-invocation count may have been lost).
_STALL_LEASES = 4

logger = logging.getLogger(__name__)


class RedisUnavailableError(ConnectionError):
    """Redis went away during a run, or came back without the run's state."""


@dataclass
class Run:
    """One compute; see the module docstring."""

    dag: DAG
    bundling: Bundling
    plan: Plan
    record: RunRecord
    store: RunStore
    progress: RunProgress
    backend: Backend
    signer: Signer
    lease_ms: int
    recovered_invocations: int = 0
    idle_watches: int = 0
    primaries: frozenset[str] = frozenset()
    # Configurations given since the plan: tasks that ran out of memory, one size up.
    memory_mb: dict[int, int] = field(default_factory=dict)
    # For a nested run: whether the run of the task that started it is gone.
    parent_gone: Callable[[], bool] | None = None

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def execute(
        self,
        sealed_record: bytes,
        timeout: float | None,
        literals: dict[int, bytes] | None = None,
    ) -> Sequence[Any]:
        """Submit the run and wait for its values; whatever goes wrong, purge its keys.

        ``literals`` are the signed values of the record's large literals, by node.
        """
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        starts = self.bundling.starts
        self.store.create(sealed_record, invocations=len(starts), literals=literals)
        self.primaries = self.store.primaries()
        try:
            self.invoke(starts)
            return self.wait(deadline, timeout)
        except BaseException:
            # Through a short outage too (a Redis Cluster failover): nothing may be left.
            self.with_retries(self.store.purge, len(self.dag), self.record.literals)
            raise

    def invoke(self, starts: Sequence[Sequence[int]]) -> None:
        """One invocation per start, each in the configuration its tasks need."""
        logger.debug("run %s: invoking %d workers", self.run_id, len(starts))
        self.backend.invoke(
            [
                Invocation.new(
                    self.run_id,
                    tasks,
                    self.store.ttl_s,
                    self.lease_ms,
                    memory_mb=self.memory_for(tasks),
                )
                for tasks in starts
            ]
        )

    def memory_for(self, tasks: Sequence[int]) -> int | None:
        """The configuration an invocation of ``tasks`` needs: the plan's, or larger for a
        task that ran out of memory."""
        planned = self.record.planned_memory(list(tasks))
        larger = [self.memory_mb[t] for t in tasks if t in self.memory_mb]
        return max([planned or 0, *larger]) or None

    def retry_out_of_memory(self, configs: Sequence[int]) -> None:
        """Give tasks killed for their memory the next larger configuration.

        The dead invocation's lease lapses and ``watch`` re-invokes its restart point at
        the configuration its tasks now have. A task that ran out of memory at the largest
        configuration fails the run with ``TaskOutOfMemoryError``.
        """
        for index, killed_at in self.progress.out_of_memory:
            larger = [m for m in configs if m > killed_at]
            if not larger:
                raise TaskOutOfMemoryError(repr(self.dag.keys[index]), killed_at)
            self.memory_mb[index] = max(self.memory_mb.get(index, 0), larger[0])

    def wait(self, deadline: float | None, timeout: float | None) -> Sequence[Any]:
        """Wait for the run to end, folding its events into ``progress``.

        With callbacks to drive, the client follows the event stream as it grows. Without
        them nothing needs an event before the end, so the client sleeps in BLPOP on the
        run's signal list until the first error or the result — no wake-ups that take CPU
        from the workers — and reads the stream then. Either way it wakes every half
        lease to re-invoke the work of workers whose lease lapsed.
        """
        store, progress = self.store, self.progress
        cursor = b"0-0"
        started = time.monotonic()
        watch_every = self.lease_ms / 1000 / WATCHES_PER_LEASE
        next_watch = started + watch_every
        sealed = False
        follow = progress.follows
        while True:
            now = time.monotonic()
            wait_s = max(0.0, next_watch - now)
            if deadline is not None:
                if deadline <= now:
                    raise TimeoutError(
                        f"dask-serverless run {self.run_id} did not finish within "
                        f"{timeout} s; it was cancelled and its keys deleted"
                    )
                wait_s = min(wait_s, deadline - now)
            if follow:
                block_ms = int(min(wait_s, _POLL_MS / 1000) * 1000) + 1
                cursor, batches = self.with_retries(store.read_events, cursor, block_ms)
            else:
                self.with_retries(store.wait_signal, wait_s)
                cursor, batches = self.with_retries(store.read_events, cursor, None)
            for batch in batches:
                progress.apply(events.decode(batch))
                self.idle_watches = 0
            self.retry_out_of_memory(self.plan.inputs.configs)
            if follow and batches:
                time.sleep(min(_BATCH_PAUSE_S, (time.monotonic() - started) / 10))
            if progress.failed_index is not None:
                raise self.remote_error()
            if progress.finished:
                blob = self.with_retries(store.take_result)
                if blob is None:
                    raise RuntimeError(f"run {self.run_id} finished but its result is gone")
                return self.signer.loads(blob, RESULT)
            if time.monotonic() >= next_watch:
                was_sealed, sealed = sealed, self.with_retries(self.watch)
                if was_sealed and sealed:
                    blob = store.get_result()
                    store.purge(len(self.dag), self.record.literals)
                    if blob is not None:
                        return self.signer.loads(blob, RESULT)
                next_watch = time.monotonic() + watch_every

    def with_retries(self, command: Callable[..., _T], *args: Any) -> _T:
        """Run ``command``, riding out a short Redis outage (or a cluster failover, while a
        replica is promoted); a lost run is a clear error."""
        for attempt in range(_REDIS_RETRIES):
            try:
                return command(*args)
            except _OUTAGES as error:
                if attempt == _REDIS_RETRIES - 1:
                    raise RedisUnavailableError(
                        f"lost the connection to Redis during a run: {error}"
                    ) from None
                logger.warning(
                    "run %s: Redis connection lost (%s); retrying (%d of %d)",
                    self.run_id,
                    error,
                    attempt + 1,
                    _REDIS_RETRIES - 1,
                )
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def watch(self) -> bool:
        """Re-invoke the work of workers whose lease lapsed; notice a Redis that lost us.

        Returns whether the run is sealed (its result stored). A run found sealed twice in
        a row lost its sink's worker between storing the result and announcing it.
        """
        if self.parent_gone is not None and self.parent_gone():
            raise RuntimeError(
                f"nested run {self.run_id} stopped: the run of the task that started it is "
                "gone; its keys were deleted"
            )
        failure = self.backend.failure
        if failure is not None:
            raise RuntimeError(
                f"the {self.backend.name} backend stopped serving invocations: {failure}"
            ) from failure
        lapsed = self.store.take_lapsed_leases()
        if lapsed:
            logger.warning(
                "run %s: %d workers lost their lease; re-invoking their work",
                self.run_id,
                len(lapsed),
                extra={"run_id": self.run_id},
            )
            self.recovered_invocations += len(lapsed)
            self.store.note_invoked(len(lapsed))
            self.invoke(lapsed)
        phase = self.store.phase()
        if phase == "lost":
            raise RedisUnavailableError(
                f"Redis no longer holds run {self.run_id} (was the server restarted or "
                "flushed?); the run cannot finish"
            )
        self.check_stalled(phase)
        return phase == "sealed"

    def check_stalled(self, phase: str) -> None:
        """Fail a live run that nobody works on any more (see the module docstring)."""
        running, queued = self.store.running_and_queued() if phase == "running" else (1, 0)
        failover = self.store.primaries() != self.primaries
        if running or (queued and not failover):
            self.idle_watches = 0
            return
        self.idle_watches += 1
        patience = WATCHES_PER_LEASE * (_STALL_LEASES if queued else 1)
        if self.idle_watches > patience:
            cause = (
                "a Redis Cluster failover lost acknowledged writes"
                if failover
                else ("were acknowledged writes lost by Redis?")
            )
            raise RedisUnavailableError(
                f"run {self.run_id} stalled: no worker holds or awaits any of its work "
                f"({cause}); the run cannot finish"
            )

    def remote_error(self) -> BaseException:
        """The exception of the task that failed, as the worker recorded it."""
        blob = self.store.get_error()
        if blob is None:
            return RuntimeError(f"a task of run {self.run_id} failed but left no error")
        exc = self.signer.loads(blob, ERROR)
        if not isinstance(exc, BaseException):
            return RuntimeError(f"a task of run {self.run_id} failed: {exc!r}")
        sources = SourceIndex()
        sources.add_main_module()
        sources.add_objects(self.dag.nodes)
        return with_sources(exc, sources)
