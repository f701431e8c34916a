"""The one entry point every backend calls: ``handler(event, context)``.

A serverless instance is reused for many invocations, so what is costly to build — the
Redis connection, the run records already loaded, the lease-renewing heartbeat thread —
lives in a ``WorkerEnvironment`` that the instance keeps between invocations (a warm start
pays neither an import nor a connection). The backend that starts an instance installs its
environment with ``install``; this module-level slot is the only state a worker process
keeps, and it holds no run's data beyond a small LRU of run records keyed by unguessable
run ids. On AWS Lambda no backend starts the instance: the first invocation builds the
environment from the function's environment variables (``_bootstrap``).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis

from dask_serverless import events
from dask_serverless.storage.redis import RunStore, Scripts, client_for
from dask_serverless.storage.s3 import LargeOutputStore
from dask_serverless.storage.serialize import Signer
from dask_serverless.worker.cache import OutputCache
from dask_serverless.worker.metrics import MemoryProbe, ProcessPeak
from dask_serverless.worker.runtime import Branch, Invoker, RunRecord, WorkerLogic, run_branch

RECORD_CACHE_SIZE = 8
# Outputs a warm instance keeps for later tasks of the same run (see worker/cache.py).
CACHE_BYTES = 256 * 2**20


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
            interval = (lease[2] if lease else 3000) / 3000
            self._wake.wait(interval)
            if lease is None:
                continue
            store, invocation_id, lease_ms = lease
            try:
                alive = store.renew_lease(invocation_id, lease_ms)
            except redis.RedisError:
                continue
            if not alive:
                self._gone_run = store.run_id


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
    ) -> None:
        self.redis = client_for(redis_url)
        self.scripts = Scripts(self.redis)
        self.signer = Signer(secret)
        self.invoker = invoker
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.logic = logic or WorkerLogic()
        self.records: OrderedDict[str, RunRecord] = OrderedDict()
        self.heartbeat = Heartbeat()
        self.invocations = 0
        self.large_outputs = large_outputs
        self.handoff_margin_ms = int(handoff_margin_ms)
        # Called before every task (the local backend notes the running task for OOM reports).
        self.on_task: Callable[[Branch, int], None] | None = None
        # Measures each task's peak memory: the backend's probe (a cgroup's), else the
        # process's peak.
        self.memory_probe: MemoryProbe = ProcessPeak()
        self.cache = OutputCache(cache_bytes)

    def cached_record(self, run_id: str) -> RunRecord | None:
        record = self.records.get(run_id)
        if record is not None:
            self.records.move_to_end(run_id)
        return record

    def remember(self, record: RunRecord) -> None:
        self.records[record.run_id] = record
        while len(self.records) > RECORD_CACHE_SIZE:
            self.records.popitem(last=False)


_environment: WorkerEnvironment | None = None


def install(environment: WorkerEnvironment) -> None:
    """Called once by the backend in each new instance, before the first invocation."""
    global _environment
    _environment = environment


def _bootstrap() -> WorkerEnvironment:
    """No backend installed an environment: this is an AWS Lambda instance's first call."""
    from dask_serverless.backends.aws_lambda import worker_environment

    environment = worker_environment(os.environ)
    install(environment)
    return environment


def _memory_of(context: Any) -> int | None:
    """The invocation's configuration (MB), as Lambda's context (and the local one) tell."""
    memory = getattr(context, "memory_limit_in_mb", None)
    return int(memory) if memory else None


def handler(event: dict, context: Any) -> dict:
    """Run one invocation: claim it, load the run record, follow the branch.

    A warm-up invocation (``{"warm": 1}``, pre-warming) only starts the instance.
    """
    environment = _environment
    if environment is None:
        environment = _bootstrap()
    if event.get("warm"):
        return {"status": "warm"}
    environment.invocations += 1
    started = time.monotonic()
    began_unix = time.time()
    # Start-up as the platform reports it: the instance's boot to ready ("boot", a cold
    # start's), plus the hand-over from the platform to this handler.
    startup_s = float(event.get("boot", 0.0)) + max(
        0.0, began_unix - float(event.get("at", began_unix))
    )
    run_id = event["run"]
    store = RunStore(environment.redis, run_id, event["ttl"], environment.scripts)
    record = environment.cached_record(run_id)
    lease_ms = int(event.get("lease", 5000))
    begun = store.begin(event["id"], event["tasks"], lease_ms, want_record=record is None)
    if begun is None:
        return {"status": "run-gone"}
    claimed, blob = begun
    if not claimed:
        return {"status": "duplicate"}
    if record is None:
        try:
            record = environment.signer.loads(blob or b"", "run record")
        except Exception as exc:
            store.fail(environment.signer.dumps_exception(exc), events.encode([events.error(-1)]))
            return {"status": "bad-record"}
        environment.remember(record)
    branch = Branch(
        record=record,
        store=store,
        signer=environment.signer,
        invoker=environment.invoker,
        worker_id=environment.worker_id,
        new_invocation_id=lambda: secrets.token_hex(8),
        invocation_id=event["id"],
        lease_ms=lease_ms,
        cancelled=lambda: environment.heartbeat.run_gone(run_id),
        large_outputs=environment.large_outputs,
        time_left_ms=getattr(context, "get_remaining_time_in_millis", None),
        handoff_margin_ms=environment.handoff_margin_ms,
        done_before=event.get("done", ()),
        memory_mb=_memory_of(context),
        cold=environment.invocations == 1,
        on_task=environment.on_task,
        memory_probe=environment.memory_probe,
        cache=environment.cache,
    )
    branch.pending_events.append(
        events.invocation_started(
            branch.worker_id, branch.memory_mb, branch.cold, startup_s, event["id"], began_unix
        )
    )
    environment.heartbeat.hold(store, event["id"], lease_ms)
    try:
        run_branch(branch, event["tasks"], environment.logic)
    finally:
        environment.heartbeat.drop()
    return {"status": "done", "seconds": time.monotonic() - started}
