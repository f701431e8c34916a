"""The Scheduler: the long-lived façade a user hands to dask.

A Scheduler holds what outlives one compute — the Redis connection and its scripts, the
backend, the secret, the planner with its history, the settings — and turns every
``get`` into one ``Run`` (``client.run``):

1. translate the dask graph into a DAG (bad input fails here, before anything is sent);
2. plan it on the platform the backend is (``planning.Platform``), which decides the root
   bundles too;
3. seal (pickle and sign) the run record, so an unpicklable task also fails before
   dispatch;
4. hand the run to a ``Run``, which stores the record, invokes the roots and listens, and
   drive the dask callbacks around it;
5. record the run's measurements in history and keep its report for ``last_run`` — also
   when the run failed, timed out or was cancelled (``dask_serverless.recording``).

``get``, the embedded default, called inside a task (a worker runs it) starts a *nested*
run instead: a child run on the worker's own Redis and platform, through a Scheduler the
worker keeps for its tasks. While the task waits, its instance secedes from the platform's
concurrency (``seceded``), so a fan-out decided at run time cannot deadlock the limit;
the child run's error is raised in the task, and the child run stops (deleting its keys)
if the parent run goes away.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dask.callbacks import local_callbacks
from dask.local import nested_get

from dask_serverless import config, logs
from dask_serverless.backends import create_backend
from dask_serverless.backends.base import Backend
from dask_serverless.client.progress import RunProgress
from dask_serverless.client.run import (
    RedisUnavailableError,
    Run,
    StuckRunError,
    WorkerCrashedError,
)
from dask_serverless.dashboard import Dashboard, start_dashboard
from dask_serverless.graph import translate
from dask_serverless.planning import Plan, Planner, Planning, Platform
from dask_serverless.protocol.keys import new_run_id
from dask_serverless.protocol.record import RunRecord, RunSigner, seal_record
from dask_serverless.protocol.runs import RunHistory
from dask_serverless.protocol.store import RunStore, Scripts, connect
from dask_serverless.recording import RunRecorder
from dask_serverless.report import RunReport
from dask_serverless.storage.embedded import EmbeddedRedis
from dask_serverless.storage.serialize import Signer, new_secret
from dask_serverless.worker.handler import Serving, serving

# Root bundles per concurrent worker: enough to balance uneven bundles, few enough that
# each one amortises its invocation (see dask_serverless.planning.bundling).
_BUNDLES_PER_WORKER = 4
# Workers assumed for bundling when the platform's concurrency is unknown (AWS Lambda).
_UNKNOWN_CONCURRENCY = 64
# How long AWS Lambda keeps an idle instance, roughly (it does not say): the platform
# model's keep-alive where the backend gives none.
LAMBDA_KEEP_ALIVE_S = 600.0

__all__ = ["RedisUnavailableError", "Scheduler", "StuckRunError", "WorkerCrashedError", "get"]

logger = logging.getLogger(__name__)


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
        dashboard: bool | None = None,
    ) -> None:
        logs.configure()
        self._closed = False
        self._dashboard: Dashboard | None = None
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
                pricing=config.setting("planning.pricing"),
            )
            self._last_report: Callable[[], RunReport | None] | None = None
            # Run history and reports of failed runs (dask_serverless.recording).
            keep_runs = int(config.setting("history.runs"))
            self._recorder = RunRecorder(
                RunHistory(self._redis, keep_runs, int(config.setting("planning.history-ttl")))
                if keep_runs > 0
                else None,
                self._planning.pricing,
            )
            if dashboard or (dashboard is None and config.setting("dashboard.enabled")):
                self._dashboard = start_dashboard(url, int(config.setting("dashboard.port")))
                print(f"dask-serverless dashboard: {self._dashboard.url}")
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
        parent_gone: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Compute ``keys`` of ``dsk`` like ``dask.threaded.get``, on serverless workers.

        ``parent_gone`` (for a nested run) stops the run when it turns true. Extra keyword
        arguments other schedulers take (``num_workers`` …) are ignored.
        """
        if self._closed:
            raise RuntimeError("this Scheduler is closed")
        run_id = new_run_id()
        dag = translate(dsk, keys, run_token=run_id)
        plan = self._planning.plan(dag, self.platform())
        bundling = plan.bundling
        logger.debug(
            "run %s: planner %s (SLA %s) chose memory %s MB",
            run_id,
            plan.planner,
            plan.sla,
            sorted(set(plan.memory_mb)),
            extra={"run_id": run_id},
        )
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
                parent_gone=parent_gone,
            )
            succeeded = False
            logger.info(
                "run %s started: %d tasks, %d invocations on the %s backend%s",
                run_id,
                len(dag) - 1,
                len(bundling.starts),
                self.backend.name,
                " (nested)" if parent_gone is not None else "",
                extra={"run_id": run_id},
            )
            run_started = time.time()
            self._recorder.started(run_id, dag, plan, run.progress, run_started)
            try:
                run.progress.start()
                if plan.prewarm:
                    self.backend.prewarm(dict(plan.prewarm))
                run_started = time.time()
                values = run.execute(sealed, limit)
                makespan = time.time() - run_started
                succeeded = True
            except BaseException as error:
                logger.info("run %s failed: %r", run_id, error, extra={"run_id": run_id})
                self._last_report = self._recorder.ended_with(
                    error, run_id, dag, plan, run.progress, run_started, self.backend.throttled
                )
                raise
            finally:
                self.recovered_invocations += run.recovered_invocations
                self.last_retries = {dag.keys[i]: n for i, n in run.progress.retries.items()}
                run.progress.finish(failed=not succeeded)
        logger.info(
            "run %s finished in %.3f s (%d invocations recovered)",
            run_id,
            makespan,
            run.recovered_invocations,
            extra={"run_id": run_id},
        )
        self._planning.finish(
            run_id,
            dag,
            plan,
            run.progress,
            run_started,
            makespan,
            throttled=self.backend.throttled,
            out_of_memory=run.progress.out_of_memory,
        )
        self._last_report = self._recorder.succeeded(
            run_id, dag, plan, run.progress, run_started, makespan, self.backend.throttled
        )
        results = dict(zip((dag.keys[i] for i in dag.requested), values, strict=True))
        return nested_get(keys, results)

    @property
    def last_run(self) -> RunReport | None:
        """The last run's plan next to what was measured (built on first use).

        A run that failed, timed out or was cancelled has one too (``status`` says so).
        """
        return None if self._last_report is None else self._last_report()

    @property
    def dashboard_link(self) -> str | None:
        """The address of the dashboard this Scheduler started, if it started one."""
        return None if self._dashboard is None else self._dashboard.url

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
        concurrency = backend.concurrency
        return Platform(
            slots=int(concurrency or config.setting("planning.lambda-concurrency")),
            load_aware=concurrency is not None,
            cores=float(os.cpu_count() or 1) if backend.name == "local" else None,
            bundles=self.bundles,
            keep_alive_s=float(getattr(backend, "keep_alive_s", LAMBDA_KEEP_ALIVE_S)),
            invoke_latency_s=float(config.setting("planning.invoke-latency")),
            cluster_output_bytes=self.cluster_output_bytes,
            warm=tuple(sorted(backend.warm_instances().items())),
        )

    def close(self) -> None:
        """Stop the backend's workers and the embedded Redis, if this Scheduler started them."""
        if self._closed:
            return
        self._closed = True
        if self._dashboard is not None:
            self._dashboard.stop()
        if hasattr(self, "_recorder"):
            self._recorder.close()
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
    """The embedded default: like ``dask.threaded.get``, on a process-wide Scheduler.

    Inside a task it starts a nested run on the worker's Redis and platform instead.
    """
    invocation = serving()
    if invocation is not None:
        return child_run_get(invocation, dsk, keys, **kwargs)
    return _default.get()(dsk, keys, **kwargs)


def child_run_get(invocation: Serving, dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Compute ``keys`` as a child run of the task ``invocation`` is running."""
    environment = invocation.environment
    platform = environment.invoker
    if not isinstance(platform, Backend):
        raise RuntimeError(
            f"this worker's platform ({type(platform).__name__}) cannot start nested runs"
        )
    if environment.nested_client is None:
        environment.nested_client = Scheduler(
            redis=environment.redis_url,
            backend=platform,
            secret=environment.secret,
            dashboard=False,  # a worker serves no pages; the parent's dashboard sees the run
        )
    seceded = getattr(platform, "seceded", contextlib.nullcontext)
    with seceded():
        return environment.nested_client.get(dsk, keys, parent_gone=invocation.cancelled, **kwargs)
