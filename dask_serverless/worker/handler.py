"""The worker's entry: ``handler(event, context)`` runs one invocation.

A serverless instance is reused for many invocations, so what is costly to build — the
Redis connection, the run records already loaded, the lease keeper (a heartbeat thread,
unless the backend renews leases from outside this interpreter) — lives in a
``WorkerEnvironment`` that the instance keeps between invocations (a warm start pays
neither an import nor a connection). A backend's entry point (the local instance's
main, the Lambda handler in ``backends.aws_lambda.entry``, the inline backend) builds the
environment once and calls ``serve`` (or ``handle`` with a JSON payload) for every
invocation; this module knows no backend. The environment holds no run's data beyond a
small LRU of run records keyed by unguessable run ids.

``serve`` reads top to bottom: claim the invocation (a duplicate delivery stops here; a
Redis that does not answer is asked again within the lease),
open the run record (once per process and run), then follow the branch (``worker.loop``)
while the heartbeat keeps the lease.

While it follows the branch, ``serving()`` tells code running in a task which worker runs
it: ``dask_serverless.get`` called inside a task starts a *nested* run on the worker's
Redis and platform (the environment's invoker, when it is a complete backend) instead of
a new embedded Redis and pool.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis

from dask_serverless.constants import HEARTBEATS_PER_LEASE
from dask_serverless.protocol import events
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.record import RunRecord, RunSigner, open_record
from dask_serverless.protocol.store import RunStore, Scripts, StoreRefusedError, client_for
from dask_serverless.storage.s3 import LargeOutputStore
from dask_serverless.storage.serialize import Signer
from dask_serverless.worker.branch import Branch, Invoker, MemoryProbe
from dask_serverless.worker.cache import OutputCache
from dask_serverless.worker.loop import WorkerLogic, run_branch
from dask_serverless.worker.metrics import ProcessPeak

RECORD_CACHE_SIZE = 8
# First pause before an invocation's first Redis call is tried again (doubling).
_FIRST_RETRY_S = 0.1
# How long a booting instance keeps trying to reach Redis (a restart takes seconds).
_BOOT_RETRY_S = 10.0
_T = TypeVar("_T")
# How often an idle heartbeat thread looks for a lease to renew.
_IDLE_WAKE_S = 1.0
# Outputs a warm instance keeps for later tasks of the same run (see worker/cache.py).
CACHE_BYTES = 256 * 2**20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Serving:
    """The invocation a task runs in: its worker's environment, and whether its run is
    gone (a nested run started by the task stops then, and deletes its keys)."""

    environment: WorkerEnvironment
    cancelled: Callable[[], bool]


_serving: contextvars.ContextVar[Serving | None] = contextvars.ContextVar(
    "dask_serverless_serving", default=None
)


def serving() -> Serving | None:
    """The invocation the calling code runs in, if it runs in a task (else None)."""
    return _serving.get()


def handle(environment: WorkerEnvironment, event: dict, context: Any) -> dict:
    """Run the invocation whose JSON payload is ``event`` (a malformed one is refused).

    A warm-up invocation (``{"warm": 1}``, pre-warming) only starts the instance.
    """
    if event.get("warm"):
        return {"status": "warm"}
    return serve(environment, Invocation.from_payload(event), context)


def serve(environment: WorkerEnvironment, invocation: Invocation, context: Any) -> dict:
    """Claim ``invocation``, open its run record, follow its branch under a lease."""
    environment.invocations += 1
    started = time.monotonic()
    now = time.time()
    # Start-up as the platform reports it: a cold start's boot to ready (``boot_s``, where
    # the platform measures it), plus the hand-over to this handler.
    handover = now - (invocation.sent_at if invocation.sent_at is not None else now)
    startup_s = invocation.boot_s + max(0.0, handover)
    run_id = invocation.run_id
    store = RunStore(environment.redis, run_id, invocation.ttl_s, environment.scripts)
    record = environment.cached_record(run_id)
    lease_ms = invocation.lease_ms
    try:
        begun = retry_within(
            lease_ms / 1000,
            store.begin,
            invocation.invocation_id,
            invocation.tasks,
            lease_ms,
            record is None,
        )
    except redis.exceptions.OutOfMemoryError:
        report_out_of_memory(environment, store, invocation, record)
        return {"status": "redis-out-of-memory"}
    where = {"run_id": run_id, "invocation_id": invocation.invocation_id}
    if begun is None:
        logger.debug("invocation %s: run %s is gone", invocation.invocation_id, run_id, extra=where)
        return {"status": "run-gone"}
    claimed, blob = begun
    if not claimed:
        logger.debug(
            "invocation %s: duplicate delivery dropped", invocation.invocation_id, extra=where
        )
        return {"status": "duplicate"}
    if record is None:
        try:
            record = open_record(environment.signer, blob or b"", run_id)
        except Exception as exc:
            signer = RunSigner(environment.signer, run_id)
            store.fail(signer.dumps_exception(exc), events.encode([events.error(-1)]))
            return {"status": "bad-record"}
        environment.remember(record)
    branch = Branch(
        record=record,
        store=store,
        signer=RunSigner(environment.signer, run_id),
        invoker=environment.invoker,
        worker_id=environment.worker_id,
        invocation_id=invocation.invocation_id,
        lease_ms=lease_ms,
        cancelled=lambda: environment.heartbeat.run_gone(run_id),
        large_outputs=environment.large_outputs,
        time_left_ms=getattr(context, "get_remaining_time_in_millis", None),
        handoff_margin_ms=environment.handoff_margin_ms,
        done_before=invocation.done,
        memory_mb=_memory_of(context),
        cold=environment.invocations == 1,
        on_task=environment.on_task,
        memory_probe=environment.memory_probe,
        cache=environment.cache,
    )
    branch.pending_events.append(
        events.invocation_started(
            branch.worker_id,
            branch.memory_mb,
            branch.cold,
            startup_s,
            invocation.invocation_id,
            now,
        )
    )
    environment.heartbeat.hold(store, invocation.invocation_id, lease_ms)
    logger.debug(
        "invocation %s of run %s: tasks %s (%s start)",
        invocation.invocation_id,
        run_id,
        list(invocation.tasks),
        "cold" if branch.cold else "warm",
        extra=where,
    )
    token = _serving.set(Serving(environment, branch.cancelled))
    try:
        run_branch(branch, invocation.tasks, environment.logic)
    finally:
        _serving.reset(token)
        environment.heartbeat.drop()
    seconds = time.monotonic() - started
    logger.debug(
        "invocation %s: %d tasks in %.3f s",
        invocation.invocation_id,
        len(branch.completed),
        seconds,
        extra=where,
    )
    return {"status": "done", "seconds": seconds}


def report_out_of_memory(
    environment: WorkerEnvironment,
    store: RunStore,
    invocation: Invocation,
    record: RunRecord | None,
) -> None:
    """Redis is too full to start ``invocation``: fail the run saying so (reads and
    deletes still work, so the record is read and the run's outputs make room)."""
    if record is None:
        try:
            record = open_record(environment.signer, store.get_record() or b"", store.run_id)
        except Exception:
            return
    tasks = ", ".join(repr(record.dag.keys[i]) for i in invocation.tasks[:5])
    error = StoreRefusedError(
        f"Redis is out of memory (maxmemory, no eviction) and refused to start {tasks} "
        f"(key {store.keys.invocations})"
    )
    signer = RunSigner(environment.signer, store.run_id)
    with contextlib.suppress(redis.RedisError):
        store.fail(
            signer.dumps_exception(error),
            events.encode([events.error(invocation.tasks[0])]),
            len(record.dag),
        )


def retry_within(seconds: float, command: Callable[..., _T], *args: Any) -> _T:
    """``command(*args)``, retried while Redis cannot be reached, for up to ``seconds``.

    An invocation's first call claims it: the platform will not deliver it again, so a
    Redis blip at that moment must not lose it. Within one lease nobody else could have
    noticed it missing; past that the client sends it again (see ``client.run``).
    """
    give_up = time.monotonic() + seconds
    pause = _FIRST_RETRY_S
    while True:
        try:
            return command(*args)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() + pause > give_up:
                raise
            time.sleep(pause)
            pause *= 2


def _memory_of(context: Any) -> int | None:
    """The invocation's configuration (MB), as Lambda's context (and the local one) tell."""
    memory = getattr(context, "memory_limit_in_mb", None)
    return int(memory) if memory else None


class WorkerEnvironment:
    """What an instance keeps between invocations."""

    def __init__(
        self,
        redis_url: str,
        secret: bytes,
        invoker: Invoker,
        worker_id: str | None = None,
        logic: WorkerLogic | None = None,
        large_outputs: LargeOutputStore | None = None,
        handoff_margin_ms: int = 0,
        cache_bytes: int = CACHE_BYTES,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.secret = secret
        # A Redis restarting or paused while the instance boots is waited for, as its
        # invocation's first call is: a platform that sees boots fail stops starting them.
        self.redis = retry_within(_BOOT_RETRY_S, client_for, redis_url)
        self.scripts = Scripts(self.redis)
        self.signer = Signer(secret)
        self.invoker = invoker
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.logic = logic or WorkerLogic()
        self.records: OrderedDict[str, RunRecord] = OrderedDict()
        # Who renews the running invocation's lease: a thread of this interpreter unless
        # the backend keeps it from outside (``backends.aws_lambda.leases`` on Lambda).
        self.heartbeat: LeaseKeeper = leases or Heartbeat()
        self.invocations = 0
        self.large_outputs = large_outputs
        self.handoff_margin_ms = int(handoff_margin_ms)
        # Called before every task (the local backend notes the running task for OOM reports).
        self.on_task: Callable[[Branch, int], None] | None = None
        # Measures each task's peak memory: the backend's probe (a cgroup's), else the
        # process's peak.
        self.memory_probe: MemoryProbe = ProcessPeak()
        self.cache = OutputCache(cache_bytes)
        # The client (a Scheduler) for nested runs this instance's tasks start, built on
        # first use by ``dask_serverless.get`` and kept with the instance.
        self.nested_client: Any = None

    def cached_record(self, run_id: str) -> RunRecord | None:
        record = self.records.get(run_id)
        if record is not None:
            self.records.move_to_end(run_id)
        return record

    def remember(self, record: RunRecord) -> None:
        self.records[record.run_id] = record
        while len(self.records) > RECORD_CACHE_SIZE:
            self.records.popitem(last=False)


class LeaseKeeper(Protocol):
    """Keeps the lease of the invocation an instance runs, and notices its run gone."""

    def hold(self, store: RunStore, invocation_id: str, lease_ms: int) -> None:
        """Start renewing ``invocation_id``'s lease (the invocation has begun)."""

    def drop(self) -> None:
        """Stop renewing (the invocation has ended)."""

    def run_gone(self, run_id: str) -> bool:
        """Whether a renewal found ``run_id`` gone (finished, failed, cancelled)."""


class Heartbeat:
    """Renews the lease of the invocation this instance is running, in the background.

    One daemon thread per instance, started on first use. It renews every third of the
    lease so that one missed beat does not lapse it, and remembers when Redis says the
    run is gone so the branch loop stops before its next task.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._lease: tuple[RunStore, str, int] | None = None
        self._gone_run: str | None = None
        self._thread: threading.Thread | None = None

    def hold(self, store: RunStore, invocation_id: str, lease_ms: int) -> None:
        with self._lock:
            self._lease = (store, invocation_id, lease_ms)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat, name="dask-serverless-heartbeat", daemon=True
                )
                self._thread.start()

    def drop(self) -> None:
        with self._lock:
            self._lease = None

    def run_gone(self, run_id: str) -> bool:
        return self._gone_run == run_id

    def _beat(self) -> None:
        while True:
            with self._lock:
                lease = self._lease
            interval = lease[2] / 1000 / HEARTBEATS_PER_LEASE if lease else _IDLE_WAKE_S
            self._wake.wait(interval)
            if lease is None:
                continue
            store, invocation_id, lease_ms = lease
            try:
                alive = store.renew_lease(invocation_id, lease_ms)
            except (redis.RedisError, redis.RedisClusterException):
                continue
            if not alive:
                self._gone_run = store.run_id
