"""The Scheduler: the long-lived façade a user hands to dask.

A Scheduler holds what outlives one compute — the Redis connection and its scripts, the
backend, the secret, the planner with its history, the settings — and turns every
``get`` into one ``Run`` (``client.run``):

1. translate the dask graph into a DAG (bad input fails here, before anything is sent);
2. bundle its roots and plan it;
3. seal (pickle and sign) the run record, so an unpicklable task also fails before
   dispatch;
4. hand the run to a ``Run``, which stores the record, invokes the roots and listens, and
   drive the dask callbacks around it;
5. record the run's measurements in history and keep its report for ``last_run``.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dask.callbacks import local_callbacks
from dask.local import nested_get

from dask_serverless import config
from dask_serverless.backends import create_backend
from dask_serverless.backends.base import Backend
from dask_serverless.client.bundling import bundle_roots
from dask_serverless.client.progress import RunProgress
from dask_serverless.client.run import (
    RedisUnavailableError,
    Run,
    StuckRunError,
    WorkerCrashedError,
)
from dask_serverless.graph import translate
from dask_serverless.planning import Plan, Planner, Planning
from dask_serverless.protocol.keys import new_run_id
from dask_serverless.protocol.record import RunRecord, RunSigner, seal_record
from dask_serverless.protocol.store import RunStore, Scripts, connect
from dask_serverless.report import RunReport
from dask_serverless.storage.embedded import EmbeddedRedis
from dask_serverless.storage.serialize import Signer, new_secret

# Root bundles per concurrent worker: enough to balance uneven bundles, few enough that
# each one amortises its invocation (see dask_serverless.client.bundling).
_BUNDLES_PER_WORKER = 4
# Workers assumed for bundling when the platform's concurrency is unknown (AWS Lambda).
_UNKNOWN_CONCURRENCY = 64

__all__ = ["RedisUnavailableError", "Scheduler", "StuckRunError", "WorkerCrashedError", "get"]


class Scheduler:
    """A dask scheduler that runs every task on serverless workers.

    ``redis=None`` starts a private redis-server for this Scheduler (the embedded
    default); a URL (``redis://``, ``rediss://``, ``unix://``) uses an existing server.
    ``backend`` is ``"local"`` (a local process pool that behaves like a serverless
    platform), ``"inline"`` (workers run in this process, one invocation at a time, to
    step through with pdb), ``"lambda"`` (AWS Lambda functions deployed by ``dask-serverless lambda
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
        max_reinvocations: int | None = None,
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
            self.max_reinvocations = int(config.setting("max-reinvocations", max_reinvocations))
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
            workers = self._backend.concurrency or _UNKNOWN_CONCURRENCY
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
            )
            self._last_report: Callable[[], RunReport] | None = None
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
        bundling = bundle_roots(dag, self.bundles)
        plan = self._planning.plan(dag)
        record = RunRecord(
            run_id,
            dag,
            retries=self.retries,
            retry_backoff_s=self.retry_backoff,
            max_output_bytes=self.max_output_bytes,
            internal=bundling.internal,
            cluster_output_bytes=self.cluster_output_bytes,
            memory=plan.worker_memory(),
            concurrency=self.backend.concurrency,
        )
        sealed = seal_record(self._signer, record)
        limit = self.timeout if timeout is None else timeout
        with local_callbacks(callbacks) as active:
            run = Run(
                dag=dag,
                bundling=bundling,
                plan=plan,
                record=record,
                store=RunStore(self._redis, run_id, self.run_ttl, self._scripts),
                progress=RunProgress(dag, callbacks=active),
                backend=self.backend,
                signer=RunSigner(self._signer, run_id),
                lease_ms=self.lease_ms,
                max_reinvocations=self.max_reinvocations,
            )
            succeeded = False
            try:
                run.progress.start()
                run_started = time.time()
                values = run.execute(sealed, limit)
                makespan = time.time() - run_started
                succeeded = True
            finally:
                self.recovered_invocations += run.recovered_invocations
                self.last_retries = {dag.keys[i]: n for i, n in run.progress.retries.items()}
                run.progress.finish(failed=not succeeded)
        self._last_report = self._planning.finish(
            run_id, dag, plan, run.progress, run_started, makespan, throttled=self.backend.throttled
        )
        results = dict(zip((dag.keys[i] for i in dag.requested), values, strict=True))
        return nested_get(keys, results)

    @property
    def last_run(self) -> RunReport | None:
        """The last successful run's plan next to what was measured (built on first use)."""
        return None if self._last_report is None else self._last_report()

    def plan(self, dsk: Any, keys: Any) -> Plan:
        """The plan a compute of ``keys`` would get now, to print or inspect; runs nothing."""
        return self._planning.plan(translate(dsk, keys))

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
