"""One run on the client side: from the stored record to the values of the requested keys.

A ``Run`` holds everything one ``compute`` needs — the DAG, its bundling and plan, the
run record, the run's store, its progress — and walks the run through its states:

1. ``submit``: store the signed record (the run is alive from now on) together with the
   count of the invocations about to start, then invoke one worker per bundle or root;
2. ``wait``: only listen (I-2). Progress drives the dask callbacks, an error event raises
   the task's own exception, ``finished`` means the sink's worker stored the result and
   deleted every intermediate key (when every task was placed in the client, the client
   did, storing only the places of the values it kept). While it waits it also *watches*:

   * an invocation whose lease lapsed (its worker died), or whose instance the platform
     reports dead, is re-invoked from its restart point — at most
     ``serverless.max-reinvocations`` times for the same work, then the run fails with
     ``WorkerCrashedError`` naming the task and the cause;
   * when no invocation runs and nothing progressed for ``STUCK_LEASES`` leases,
     invocations noted as queued that never began (lost in a Redis blip) are sent again,
     under the same ids, so a duplicate is dropped;
   * a run with no live lease, nothing queued and no progress for ``STUCK_LEASES``
     lease periods can never finish: ``StuckRunError`` names the tasks that can no
     longer run;
   * a Redis that lost the run (restarted) is a clear error, and a Redis that hangs
     cannot hold the compute past its deadline (every call has a socket timeout); a
     Redis Cluster failover is ridden out like a short outage, and a run that a failover
     left stuck (a master acknowledged writes it never replicated, such as a parent's mark
     in a fan-in inbox) fails with ``StuckRunError`` saying so;
   Meanwhile the Scheduler's keep-alive thread (``RunKeeper``, one for all its runs: a
   compute starts no thread) gives the run's live keys (the fixed ones, the outputs
   that unfinished tasks still read, the inboxes of tasks some parent reported to) their
   TTL (``serverless.run-ttl``, a minute) again every quarter of it: the keys of a client
   that was killed are gone a minute later, and its workers stop once the record is;
3. the client reads the last events and the result and deletes them, in one round trip
   when the ``finished`` signal woke it — or, when the run failed, timed out or
   was interrupted, the backend stops the run's running tasks (``Backend.cancel``) and
   ``purge`` deletes every key the run may have written (the record first, which stops
   every worker from writing again). A clean-up Redis refuses is retried in the
   background until it succeeds or the keys' TTL has passed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from dask_serverless.backends.base import Backend
from dask_serverless.client.progress import RunProgress
from dask_serverless.client.tracebacks import SourceIndex, with_sources
from dask_serverless.constants import KEEP_ALIVES_PER_TTL, STUCK_LEASES, WATCHES_PER_LEASE
from dask_serverless.graph import DAG
from dask_serverless.planning import Plan
from dask_serverless.planning.bundling import Bundling
from dask_serverless.protocol import events
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.record import ERROR, RESULT, RunRecord, RunSigner
from dask_serverless.protocol.store import RunStore

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
# What a keep-alive or a clean-up rides out: any Redis error, cluster ones included.
_OUTAGES_AND_REFUSALS = (redis.RedisError, redis.exceptions.RedisClusterException)
# A clean-up Redis refused is tried again after this many seconds, doubling up to a minute.
_CLEANUP_RETRY_S = 1.0
_CLEANUP_RETRY_MAX_S = 60.0
# Tasks named in a stuck run's error, at most.
_NAMED_TASKS = 10

logger = logging.getLogger(__name__)


class RedisUnavailableError(ConnectionError):
    """Redis went away during a run, or came back without the run's state."""


class WorkerCrashedError(RuntimeError):
    """The instance running a task died (exit, signal, out of memory, lost) too often.

    ``key`` is the task's dask key, ``cause`` what the platform knows of the death.
    """

    def __init__(self, key: Any, cause: str, crashes: int) -> None:
        super().__init__(
            f"task {key!r} lost its worker {crashes} times ({cause}); gave up after "
            f"{crashes - 1} re-invocations (serverless.max-reinvocations)"
        )
        self.key = key
        self.cause = cause
        self.crashes = crashes

    def __reduce__(self) -> tuple:
        return (WorkerCrashedError, (self.key, self.cause, self.crashes))


class StuckRunError(RuntimeError):
    """No worker runs, nothing is queued and nothing progresses: the run cannot finish."""


class RedisTimeoutError(TimeoutError):
    """The deadline passed while Redis did not answer."""


class RunKeeper:
    """One thread that refreshes the live keys of every run in progress every quarter of
    its TTL (``Run.keep_alive``), started with the first run and kept until ``close``."""

    def __init__(self) -> None:
        self._runs: dict[str, tuple[Run, float]] = {}  # run id → (run, last refresh)
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, run: Run) -> None:
        with self._changed:
            self._runs[run.run_id] = (run, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._keep, name="dask-serverless-keep-alive", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def discard(self, run: Run) -> None:
        with self._changed:
            self._runs.pop(run.run_id, None)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _keep(self) -> None:
        """Refresh each run whose quarter TTL passed; sleep until the next one is due."""
        while True:
            with self._changed:
                if self._closed:
                    return
                now = time.monotonic()
                due = []
                next_due: float | None = None
                for run_id, (run, last) in self._runs.items():
                    at = last + run.store.ttl_s / KEEP_ALIVES_PER_TTL
                    if at <= now:
                        due.append(run)
                        self._runs[run_id] = (run, now)
                        at = now + run.store.ttl_s / KEEP_ALIVES_PER_TTL
                    next_due = at if next_due is None else min(next_due, at)
                if not due:
                    self._changed.wait(None if next_due is None else next_due - now)
                    continue
            for run in due:
                run.keep_alive()


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
    signer: RunSigner
    lease_ms: int
    max_reinvocations: int = 2
    recovered_invocations: int = 0
    primaries: frozenset[str] = frozenset()
    # Configurations given since the plan: tasks that ran out of memory, one size up.
    memory_mb: dict[int, int] = field(default_factory=dict)
    # For a nested run: whether the run of the task that started it is gone.
    parent_gone: Callable[[], bool] | None = None
    # What refreshes the TTL of the run's live keys while it runs (the Scheduler's).
    keeper: RunKeeper | None = None

    def __post_init__(self) -> None:
        # Crashes per restart point, and re-sends per never-begun invocation.
        self.crashes: dict[tuple[int, ...], int] = {}
        self.resent: dict[str, int] = {}
        self.last_progress = time.monotonic()
        self.deadline: float | None = None
        # Held while events are folded into ``progress``, which the keep-alive reads.
        self.lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def execute(
        self,
        sealed_record: bytes,
        timeout: float | None,
        literals: dict[int, bytes] | None = None,
        here: Sequence[int] = (),
        serve_here: Callable[[Invocation], Sequence[Any] | None] | None = None,
    ) -> Sequence[Any]:
        """Submit the run and wait for its values; whatever goes wrong, purge its keys.

        ``literals`` are the signed values of the record's large literals, by node.
        ``here`` are the start tasks of the invocation the client runs itself, through
        ``serve_here``, right after invoking the others (``client.placed``); when that
        invocation finished the run, it returns the values, which the stored result only
        holds the places of.
        """
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        self.deadline = deadline
        invocations = self.invocations(self.bundling.starts)
        local = self.invocations([here]) if here else []
        try:
            self.store.create(sealed_record, invocations + local, literals=literals)
        except _OUTAGES as error:
            # Its reply may be what was lost: whatever was stored goes again.
            self.clean_up(True)
            raise RedisUnavailableError(
                f"cannot reach Redis to start run {self.run_id}: {error}"
            ) from None
        self.primaries = self.store.primaries()
        keeper = self.keeper or RunKeeper()  # a run without a Scheduler's: its own
        keeper.add(self)
        try:
            logger.debug("run %s: invoking %d workers", self.run_id, len(invocations))
            if invocations:
                self.backend.invoke(invocations)
            held = None
            for invocation in local:
                assert serve_here is not None
                held = serve_here(invocation)
            values = self.wait(deadline, timeout)
            return values if held is None else held
        except BaseException as error:
            keeper.discard(self)
            redis_trouble = isinstance(error, (RedisUnavailableError, RedisTimeoutError))
            self.clean_up(redis_trouble)
            raise
        finally:
            keeper.discard(self)
            if keeper is not self.keeper:
                keeper.close()

    def keep_alive(self) -> None:
        """Refresh the TTL of the run's live keys (a Redis that refuses is ridden out:
        the next refresh comes a quarter TTL later)."""
        with self.lock:
            keys = self.live_keys()
        with contextlib.suppress(*_OUTAGES_AND_REFUSALS):
            self.store.keep_alive(keys)

    def live_keys(self) -> list[str]:
        """The keys the run may still need: the fixed ones, its large literals, outputs an
        unfinished task reads, inboxes of unfinished tasks that a parent reported to."""
        dag, done, keys = self.dag, self.progress.seen, self.store.keys
        live = keys.fixed() + [keys.literal(i) for i in self.record.literals]
        for index in done:
            if any(child not in done for child in dag.dependents[index]):
                live.append(keys.output(index))
                live.extend(keys.inbox(c) for c in dag.dependents[index] if c not in done)
        return list(dict.fromkeys(live))

    def invocations(self, starts: Sequence[Sequence[int]]) -> list[Invocation]:
        """One invocation per start, each in the configuration its tasks need."""
        return [
            Invocation.new(
                self.run_id,
                tasks,
                self.store.ttl_s,
                self.lease_ms,
                memory_mb=self.memory_for(tasks),
            )
            for tasks in starts
        ]

    def invoke(self, starts: Sequence[Sequence[int]]) -> None:
        """Note the invocations as queued, then send them."""
        logger.debug("run %s: invoking %d workers", self.run_id, len(starts))
        invocations = self.invocations(starts)
        self.store.note_invoked(invocations)
        self.backend.invoke(invocations)

    def clean_up(self, redis_trouble: bool) -> None:
        """Stop the run's running tasks and delete its keys; retried in the background
        while Redis refuses, so that a hung Redis does not hold the compute."""
        self.backend.cancel(self.run_id)
        node_count, literals, store = len(self.dag), self.record.literals, self.store
        if not redis_trouble:
            try:
                store.purge(node_count, literals)
                return
            except _OUTAGES_AND_REFUSALS:
                pass
        give_up = time.monotonic() + store.ttl_s

        def purge_until_done() -> None:
            pause = _CLEANUP_RETRY_S
            while time.monotonic() < give_up:
                try:
                    store.purge(node_count, literals)
                    return
                except _OUTAGES_AND_REFUSALS:
                    time.sleep(pause)
                    pause = min(pause * 2, _CLEANUP_RETRY_MAX_S)

        threading.Thread(
            target=purge_until_done, name=f"dask-serverless-clean-up-{self.run_id}", daemon=True
        ).start()

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
                raise events.TaskOutOfMemoryError(repr(self.dag.keys[index]), killed_at)
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
            wait_s = min(wait_s, _POLL_MS / 1000)
            result: bytes | None = None
            if follow:
                block_ms = int(wait_s * 1000) + 1
                cursor, batches = self.with_retries(store.read_events, cursor, block_ms)
            elif self.with_retries(store.wait_signal, wait_s) == "finished":
                take = store.take_events_and_result
                cursor, batches, result = self.with_retries(take, cursor)
            else:
                cursor, batches = self.with_retries(store.read_events, cursor, None)
            if batches:
                self.last_progress = time.monotonic()
            with self.lock:
                for batch in batches:
                    progress.apply(events.decode(batch))
            self.retry_out_of_memory(self.plan.inputs.configs)
            if follow and batches:
                time.sleep(min(_BATCH_PAUSE_S, (time.monotonic() - started) / 10))
            if progress.failed_index is not None:
                raise self.remote_error()
            if progress.finished:
                blob = result if result is not None else self.with_retries(store.take_result)
                if blob is None:
                    raise RuntimeError(f"run {self.run_id} finished but its result is gone")
                return self.open_result(blob)
            if time.monotonic() >= next_watch:
                was_sealed, sealed = sealed, self.with_retries(self.watch)
                if was_sealed and sealed:
                    blob = store.get_result()
                    store.purge(len(self.dag), self.record.literals)
                    if blob is not None:
                        return self.open_result(blob)
                next_watch = time.monotonic() + watch_every

    def with_retries(self, command: Callable[..., _T], *args: Any) -> _T:
        """Run ``command``, riding out a short Redis outage (or a cluster failover, while a
        replica is promoted); a lost run is a clear error.

        No retry outlasts the run's deadline: a Redis that hangs past it is a
        ``TimeoutError`` (each call is bounded by the client's socket timeout).
        """
        for attempt in range(_REDIS_RETRIES):
            try:
                return command(*args)
            except _OUTAGES as error:
                pause = 0.2 * 2**attempt
                if self.deadline is not None and time.monotonic() + pause >= self.deadline:
                    raise RedisTimeoutError(
                        f"dask-serverless run {self.run_id} did not finish within its "
                        f"timeout while Redis did not answer ({error}); its keys are "
                        "deleted once Redis answers again"
                    ) from None
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
                time.sleep(pause)
        raise AssertionError("unreachable")

    def watch(self) -> bool:
        """Re-invoke lost work, send again what never began, notice a stuck run and a
        Redis that lost us (see the module docstring).

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
        dead = self.backend.take_crashes(self.run_id)
        lapsed = self.store.take_lapsed_leases(list(dead))
        if lapsed:
            logger.warning(
                "run %s: %d workers lost their lease; re-invoking their work",
                self.run_id,
                len(lapsed),
                extra={"run_id": self.run_id},
            )
            self.last_progress = time.monotonic()
            for invocation_id, tasks in lapsed:
                self.count_crash(tasks, dead.get(invocation_id))
            self.recovered_invocations += len(lapsed)
            self.invoke([tasks for _, tasks in lapsed])
        phase = self.store.phase()
        if phase == "lost":
            raise RedisUnavailableError(
                f"Redis no longer holds run {self.run_id} (was the server restarted or "
                "flushed?); the run cannot finish"
            )
        if phase == "running" and not lapsed:
            self.look_for_lost_invocations()
        return phase == "sealed"

    def count_crash(self, tasks: Sequence[int], cause: str | None) -> None:
        """Count one more death of the instance running ``tasks``; past the cap, fail."""
        if cause is not None and cause.startswith("out of memory"):
            return  # a larger configuration is tried (``retry_out_of_memory``)
        point = tuple(sorted(tasks))
        crashes = self.crashes[point] = self.crashes.get(point, 0) + 1
        if crashes > self.max_reinvocations:
            key = self.dag.keys[point[0]] if point else "?"
            raise WorkerCrashedError(
                key,
                cause
                or "its lease lapsed: the instance stopped renewing it (killed, "
                "crashed, out of memory, or lost)",
                crashes,
            )

    def look_for_lost_invocations(self) -> None:
        """With no live lease: send again what never began; with nothing queued either
        and no progress for ``STUCK_LEASES`` leases, the run is stuck."""
        running, queued = self.store.running_and_queued()
        if running:
            return
        quiet_s = time.monotonic() - self.last_progress
        lease_s = self.lease_ms / 1000
        if queued and quiet_s >= STUCK_LEASES * lease_s:
            lost = self.store.queued_invocations()
            for invocation in lost:
                sent = self.resent[invocation.invocation_id] = (
                    self.resent.get(invocation.invocation_id, 0) + 1
                )
                if sent > self.max_reinvocations:
                    raise StuckRunError(
                        f"run {self.run_id}: invocation of {self.name_tasks(invocation.tasks)} "
                        f"was sent {sent} times and never began"
                    )
            self.last_progress = time.monotonic()
            self.backend.invoke(lost)
        elif not queued and quiet_s >= STUCK_LEASES * lease_s:
            raise StuckRunError(self.why_stuck())

    def why_stuck(self) -> str:
        """The tasks that can no longer run, and why."""
        dag, done = self.dag, self.progress.seen
        unfinished = [i for i in range(dag.sink) if i not in done]
        ready = [i for i in unfinished if all(p in done for p in dag.dependencies[i])]
        lease_s = self.lease_ms / 1000
        if ready:
            why = (
                "their inputs are all done but no worker runs them and none is queued to "
                "(their fan-in inbox was lost: evicted or deleted from Redis?)"
            )
        else:
            why = "no worker runs them, none is queued to, and nothing leads to them"
        if self.store.primaries() != self.primaries:
            why += (
                "; a Redis Cluster failover happened during the run, and a failover can "
                "lose writes a master acknowledged but had not replicated"
            )
        return (
            f"run {self.run_id} is stuck: no live lease, nothing queued and no progress "
            f"for {STUCK_LEASES * lease_s:g} s; {len(ready or unfinished)} task(s) can no "
            f"longer run, {self.name_tasks(ready or unfinished)}: {why}"
        )

    def name_tasks(self, tasks: Sequence[int]) -> str:
        names = ", ".join(repr(self.dag.keys[i]) for i in list(tasks)[:_NAMED_TASKS])
        return names + (", …" if len(tasks) > _NAMED_TASKS else "")

    def open_result(self, blob: bytes) -> Sequence[Any]:
        label = f"run result (key {self.store.keys.result})"
        values: Sequence[Any] = self.signer.loads(blob, RESULT, label=label)
        return values

    def remote_error(self) -> BaseException:
        """The exception of the task that failed, as the worker recorded it."""
        blob = self.store.get_error()
        if blob is None:
            return RuntimeError(f"a task of run {self.run_id} failed but left no error")
        exc = self.signer.loads(blob, ERROR, label=f"task error (key {self.store.keys.error})")
        if not isinstance(exc, BaseException):
            return RuntimeError(f"a task of run {self.run_id} failed: {exc!r}")
        sources = SourceIndex()
        sources.add_main_module()
        sources.add_objects(self.dag.nodes)
        return with_sources(exc, sources)
