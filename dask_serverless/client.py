"""The Scheduler: what runs in the user's process.

A ``compute`` is one *run*. The Scheduler

1. translates the dask graph into a DAG (bad input fails here, before anything is sent);
2. pickles and signs the run record, so an unpicklable task also fails before dispatch;
3. stores the record — from now on the run is alive — and starts reading the run's event
   stream from its very beginning, so no event a worker appends can be missed;
4. invokes one worker per root and from then on only listens (I-2): progress drives the
   dask callbacks, an error event raises the task's own exception, ``finished`` means the
   sink's worker stored the result and deleted every intermediate key. While it waits it
   also *watches*: an invocation whose lease lapsed (its worker died) is re-invoked from
   its restart point, and a Redis that lost the run (restarted) is a clear error;
5. reads and deletes the result — or, when the run failed, timed out or was interrupted,
   deletes every key the run may have written (the record first, which stops every worker
   from writing again).
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from dask.callbacks import local_callbacks
from dask.local import nested_get

from dask_serverless import config, events
from dask_serverless.backends import create_backend
from dask_serverless.backends.base import Backend
from dask_serverless.backends.resources import TaskOutOfMemoryError
from dask_serverless.graph import DAG, translate
from dask_serverless.planning import Plan, Planner, Planning, Platform
from dask_serverless.report import RunReport
from dask_serverless.storage.embedded import EmbeddedRedis
from dask_serverless.storage.redis import RunStore, Scripts, connect, new_run_id
from dask_serverless.storage.serialize import Signer, new_secret
from dask_serverless.worker.runtime import RunRecord, invocation

_T = TypeVar("_T")
_POLL_MS = 1000
# Root bundles per concurrent worker: enough to balance uneven bundles, few enough that
# each one amortises its invocation (see dask_serverless.bundling).
_BUNDLES_PER_WORKER = 4
_UNKNOWN_CONCURRENCY = 64
_BATCH_PAUSE_S = 0.02
_REDIS_RETRIES = 6


class RedisUnavailableError(ConnectionError):
    """Redis went away during a run, or came back without the run's state."""


class Scheduler:
    """A dask scheduler that runs every task on serverless workers.

    ``redis=None`` starts a private redis-server for this Scheduler (the embedded
    default); a URL (``redis://``, ``rediss://``, ``unix://``) uses an existing server.
    ``backend`` is ``"local"`` (a local process pool that behaves like a serverless
    platform), ``"lambda"`` (AWS Lambda functions deployed by ``dask-serverless lambda
    deploy``; ``lambda_function`` names them, ``lambda_endpoint_url`` and
    ``lambda_region`` say where their API is) or a Backend object. Unset arguments come
    from ``dask.config``'s ``serverless.*`` settings. Use it as
    ``dask.compute(x, scheduler=sched)``, under ``dask.config.set(scheduler=sched)``, or as
    a context manager; ``close()`` stops what it started.
    """

    def __init__(
        self,
        redis: str | None = None,
        backend: str | Backend | None = None,
        *,
        timeout: float | None = None,
        run_ttl: int | None = None,
        secret: bytes | str | None = None,
        concurrency: int | None = None,
        keep_alive: float | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        lease_timeout: float | None = None,
        max_output_bytes: int | None = None,
        lambda_function: str | None = None,
        lambda_endpoint_url: str | None = None,
        lambda_region: str | None = None,
        planner: str | Planner | None = None,
        sla: str | None = None,
        deadline: float | str | None = None,
        memory_configs: Sequence[int] | None = None,
        history: bool | None = None,
    ) -> None:
        self._closed = False
        self._embedded: EmbeddedRedis | None = None
        self._backend: Backend | None = None
        url = config.setting("redis", redis)
        if url is None:
            self._embedded = EmbeddedRedis(server=config.setting("embedded.server"))
            url = self._embedded.url
        try:
            self._redis = connect(url)
            self._scripts = Scripts(self._redis)
            self.timeout = config.setting("timeout", timeout)
            self.run_ttl = int(config.setting("run-ttl", run_ttl))
            self.retries = int(config.setting("retries", retries))
            self.retry_backoff = float(config.setting("retry-backoff", retry_backoff))
            self.lease_ms = int(float(config.setting("lease-timeout", lease_timeout)) * 1000)
            self.max_output_bytes = int(config.setting("max-output-bytes", max_output_bytes))
            self.cluster_output_bytes = int(config.setting("cluster-output-bytes"))
            self.recovered_invocations = 0
            self.last_retries: dict[Any, int] = {}
            shared = secret.encode() if isinstance(secret, str) else secret
            self._secret = shared or config.secret_from_environment() or new_secret()
            self._signer = Signer(self._secret)
            options = dict(config.setting("local"))
            options["concurrency"] = concurrency or options.get("concurrency")
            options["keep-alive"] = config.setting("local.keep-alive", keep_alive)
            options["lambda"] = {
                "function": lambda_function,
                "endpoint-url": lambda_endpoint_url,
                "region": lambda_region,
            }
            self._backend = create_backend(
                config.setting("backend", backend), url, self._secret, options
            )
            workers = getattr(self._backend, "concurrency", None) or _UNKNOWN_CONCURRENCY
            self.bundles = int(workers) * _BUNDLES_PER_WORKER
            # Planning (dask_serverless.planning): per-task memory from history, the SLA.
            self._planning = Planning(
                self._redis,
                planner=config.setting("planning.planner", planner),
                sla=config.setting("planning.sla", sla),
                deadline=config.setting("planning.deadline", deadline),
                memory_configs=config.setting("planning.memory-configs", memory_configs),
                history=bool(config.setting("planning.history", history)),
                history_samples=int(config.setting("planning.history-samples")),
                history_ttl_s=int(config.setting("planning.history-ttl")),
                min_work_s=float(config.setting("planning.min-work")),
                pricing=config.setting("planning.pricing"),
            )
            self._last_report: Callable[[], RunReport] | None = None
            self._run_memory: dict[str, list[int | None]] = {}
        except BaseException:
            self.close()
            raise

    @property
    def backend(self) -> Backend:
        assert self._backend is not None
        return self._backend

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        return self.get(dsk, keys, **kwargs)

    def get(
        self,
        dsk: Any,
        keys: Any,
        callbacks: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Compute ``keys`` of ``dsk`` like ``dask.threaded.get``, on serverless workers.

        Extra keyword arguments other schedulers take (``num_workers`` …) are ignored.
        """
        if self._closed:
            raise RuntimeError("this Scheduler is closed")
        run_id = new_run_id()
        dag = translate(dsk, keys, run_token=run_id)
        plan = self._planning.plan(dag, self.platform())
        bundling = plan.bundling
        record = self._sign_record(
            RunRecord(
                run_id,
                dag,
                retries=self.retries,
                retry_backoff_s=self.retry_backoff,
                max_output_bytes=self.max_output_bytes,
                internal=bundling.internal,
                cluster_output_bytes=self.cluster_output_bytes,
                memory=plan.worker_memory(),
                concurrency=getattr(self.backend, "concurrency", None),
            )
        )
        self._run_memory[run_id] = list(plan.worker_memory())
        limit = self.timeout if timeout is None else timeout
        store = RunStore(self._redis, run_id, self.run_ttl, self._scripts)
        with local_callbacks(callbacks) as active:
            progress = events.RunProgress(dag, callbacks=active)
            if active:
                progress.graph = events.callback_graph(dag)
                progress.state = events.initial_state(dag)
            started = []
            succeeded = False
            try:
                for callback in active:
                    if callback[0]:
                        callback[0](progress.graph)
                    started.append(callback)
                for callback in active:
                    if callback[1]:
                        callback[1](progress.graph, progress.state)
                prewarm = getattr(self.backend, "prewarm", None)
                if prewarm is not None and plan.prewarm:
                    prewarm(dict(plan.prewarm))
                run_started = time.time()
                values = self._run(store, dag, record, bundling.starts, progress, limit)
                makespan = time.time() - run_started
                succeeded = True
            finally:
                self._run_memory.pop(run_id, None)
                self.last_retries = {dag.keys[i]: n for i, n in progress.retries.items()}
                for callback in started:
                    if callback[4]:
                        callback[4](progress.graph, progress.state, not succeeded)
        self._last_report = self._planning.finish(
            run_id,
            dag,
            plan,
            progress,
            run_started,
            makespan,
            throttled=getattr(self.backend, "throttled", None),
            out_of_memory=progress.out_of_memory,
        )
        results = dict(zip((dag.keys[i] for i in dag.requested), values, strict=True))
        return nested_get(keys, results)

    @property
    def last_run(self) -> RunReport | None:
        """The last successful run's plan next to what was measured (built on first use)."""
        return None if self._last_report is None else self._last_report()

    def plan(self, dsk: Any, keys: Any) -> Plan:
        """The plan a compute of ``keys`` would get now, to print or inspect; runs nothing."""
        return self._planning.plan(translate(dsk, keys), self.platform())

    def platform(self) -> Platform:
        """The platform model the planner simulates runs on (``planning.simulate``).

        Its slots are the backend's concurrency (on AWS Lambda, the account's
        ``planning.lambda-concurrency``); on the local backend every instance shares this
        machine's cores. Idle instances found now start the run warm.
        """
        backend = self.backend
        concurrency = getattr(backend, "concurrency", None)
        warm_instances = getattr(backend, "warm_instances", None)
        warm = warm_instances() if warm_instances is not None else {}
        local = backend.name == "local"
        return Platform(
            slots=int(concurrency or config.setting("planning.lambda-concurrency")),
            load_aware=concurrency is not None,
            cores=float(os.cpu_count() or 1) if local else None,
            bundles=self.bundles,
            keep_alive_s=float(getattr(backend, "keep_alive_s", 600.0)),
            invoke_latency_s=float(config.setting("planning.invoke-latency")),
            cluster_output_bytes=self.cluster_output_bytes,
            warm=tuple(sorted(warm.items())),
        )

    def _sign_record(self, record: RunRecord) -> bytes:
        """The signed run record; a task that cannot be pickled is named in the error."""
        try:
            return self._signer.dumps(record, compress=True)
        except Exception as error:
            dag = record.dag
            for index in range(dag.sink):
                try:
                    self._signer.dumps(dag.nodes[index])
                except Exception as node_error:
                    raise TypeError(
                        f"task {dag.keys[index]!r} cannot be pickled for the workers: {node_error}"
                    ) from node_error
            raise TypeError(f"the run cannot be pickled for the workers: {error}") from error

    def _invoke(self, store: RunStore, starts: Sequence[Sequence[int]]) -> None:
        memory = self._run_memory.get(store.run_id)
        self.backend.invoke(
            [
                invocation(
                    store.run_id,
                    tasks,
                    store.ttl_s,
                    secrets.token_hex(8),
                    self.lease_ms,
                    memory_mb=_planned_memory(memory, tasks),
                )
                for tasks in starts
            ]
        )

    def _run(
        self,
        store: RunStore,
        dag: DAG,
        record: bytes,
        starts: Sequence[Sequence[int]],
        progress: events.RunProgress,
        timeout: float | None,
    ) -> Sequence[Any]:
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        store.create(record, invocations=len(starts))
        try:
            self._invoke(store, starts)
            return self._wait(store, progress, deadline, timeout)
        except BaseException:
            store.purge(len(dag))
            raise

    def _wait(
        self,
        store: RunStore,
        progress: events.RunProgress,
        deadline: float | None,
        timeout: float | None,
    ) -> Sequence[Any]:
        """Wait for the run to end, folding its events into ``progress``.

        With callbacks to drive, the client follows the event stream as it grows (batches
        arrive at most every ``_BATCH_PAUSE_S``). Without them nothing needs an event
        before the end, so the client sleeps in BLPOP on the run's signal list until the
        first error or the result — no wake-ups that take CPU from the workers — and reads
        the stream then. Either way it wakes every half lease to re-invoke the work of
        workers whose lease lapsed.
        """
        cursor = b"0-0"
        started = time.monotonic()
        watch_every = self.lease_ms / 2000
        next_watch = started + watch_every
        sealed = False
        follow = bool(progress.callbacks)
        while True:
            now = time.monotonic()
            wait_s = max(0.0, next_watch - now)
            if deadline is not None:
                if deadline <= now:
                    raise TimeoutError(
                        f"dask-serverless run {store.run_id} did not finish within "
                        f"{timeout} s; it was cancelled and its keys deleted"
                    )
                wait_s = min(wait_s, deadline - now)
            if follow:
                block_ms = int(min(wait_s, _POLL_MS / 1000) * 1000) + 1
                cursor, batches = self._with_retries(store.read_events, cursor, block_ms)
            else:
                self._with_retries(store.wait_signal, wait_s)
                cursor, batches = self._with_retries(store.read_events, cursor, None)
            for batch in batches:
                progress.apply(events.decode(batch))
            self._retry_out_of_memory(store, progress)
            if follow and batches:
                time.sleep(min(_BATCH_PAUSE_S, (time.monotonic() - started) / 10))
            if progress.failed_index is not None:
                raise self._remote_error(store)
            if progress.finished:
                blob = store.get_result()
                store.delete([store.result_key, store.events_key, store.signal_key])
                if blob is None:
                    raise RuntimeError(f"run {store.run_id} finished but its result is gone")
                return self._signer.loads(blob, "run result")
            if time.monotonic() >= next_watch:
                was_sealed, sealed = sealed, self._watch(store)
                if was_sealed and sealed:
                    blob = store.get_result()
                    store.purge(len(progress.dag))
                    if blob is not None:
                        return self._signer.loads(blob, "run result")
                next_watch = time.monotonic() + watch_every

    def _retry_out_of_memory(self, store: RunStore, progress: events.RunProgress) -> None:
        """Give tasks killed for their memory the next larger configuration.

        The dead invocation's lease lapses and ``_watch`` re-invokes its restart point at
        the configuration its tasks now have. A task that ran out of memory at the largest
        configuration fails the run with ``TaskOutOfMemoryError``.
        """
        memory = self._run_memory.get(store.run_id)
        if memory is None or not progress.out_of_memory:
            return
        configs = self._planning.configs
        for index, killed_at in progress.out_of_memory:
            larger = [m for m in configs if m > killed_at]
            if not larger:
                raise TaskOutOfMemoryError(repr(progress.dag.keys[index]), killed_at)
            current = memory[index] or 0
            memory[index] = max(current, larger[0])

    def _with_retries(self, command: Callable[..., _T], *args: Any) -> _T:
        """Run ``command``, riding out a short Redis outage; a lost run is a clear error."""
        for attempt in range(_REDIS_RETRIES):
            try:
                return command(*args)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if attempt == _REDIS_RETRIES - 1:
                    raise RedisUnavailableError(
                        f"lost the connection to Redis during a run: {error}"
                    ) from None
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def _watch(self, store: RunStore) -> bool:
        """Re-invoke the work of workers whose lease lapsed; notice a Redis that lost us.

        Returns whether the run is sealed (its result stored). A run found sealed twice in
        a row lost its sink's worker between storing the result and announcing it.
        """
        failure = getattr(self.backend, "failure", None)
        if failure is not None:
            raise RuntimeError(
                f"the {self.backend.name} backend stopped serving invocations: {failure}"
            ) from failure
        lapsed = store.take_lapsed_leases()
        if lapsed:
            self.recovered_invocations += len(lapsed)
            store.note_invoked(len(lapsed))
            self._invoke(store, lapsed)
        phase = store.phase()
        if phase == "lost":
            raise RedisUnavailableError(
                f"Redis no longer holds run {store.run_id} (was the server restarted or "
                "flushed?); the run cannot finish"
            )
        return phase == "sealed"

    def _remote_error(self, store: RunStore) -> BaseException:
        blob = store.get_error()
        if blob is None:
            return RuntimeError(f"a task of run {store.run_id} failed but left no error")
        exc = self._signer.loads(blob, "task error")
        if not isinstance(exc, BaseException):
            return RuntimeError(f"a task of run {store.run_id} failed: {exc!r}")
        return exc

    def close(self) -> None:
        """Stop the backend's workers and the embedded Redis, if this Scheduler started them."""
        if self._closed:
            return
        self._closed = True
        if self._backend is not None:
            self._backend.close()
        if hasattr(self, "_redis"):
            self._redis.close()
        if self._embedded is not None:
            self._embedded.stop()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _planned_memory(memory: Sequence[int | None] | None, tasks: Sequence[int]) -> int | None:
    """The configuration an invocation starting with ``tasks`` needs (the largest)."""
    sizes = [memory[t] or 0 for t in tasks] if memory is not None else []
    return max(sizes, default=0) or None


class _DefaultScheduler:
    """Holds the process-wide Scheduler behind ``dask_serverless.get``, made on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scheduler: Scheduler | None = None

    def get(self) -> Scheduler:
        with self._lock:
            if self._scheduler is None or self._scheduler._closed:
                self._scheduler = Scheduler()
                atexit.register(self._scheduler.close)
            return self._scheduler


_default = _DefaultScheduler()


def get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """The embedded default: like ``dask.threaded.get``, on a process-wide Scheduler."""
    return _default.get()(dsk, keys, **kwargs)
