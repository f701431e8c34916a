"""The Scheduler: the long-lived façade a user hands to dask.

A Scheduler holds what outlives one compute — the Redis connection and its scripts, the
backend, the secret, the planner with its history, the settings — and turns every
``get`` into one ``Run`` (``client.run``):

1. answer the requested keys that are plain data itself, with the objects themselves
   (as dask's schedulers do), and translate the rest of the dask graph into a DAG (bad
   input and bad annotations fail here, before anything is sent);
2. plan it on the platform the backend is (``planning.Platform``), which decides the root
   bundles too;
3. take large literals (persisted chunks) out of the record, store them under keys of
   their own, and seal (pickle and sign) the run record, so an unpicklable task also
   fails before dispatch; warnings the tasks raised are re-emitted after the run;
4. hand the run to a ``Run``, which stores the record, invokes the roots and listens, and
   drive the dask callbacks around it;
5. record the run's measurements in history and keep its report for ``last_run`` — also
   when the run failed, timed out or was cancelled (``dask_serverless.recording``).

Every argument is checked when the Scheduler is made, with an error that names it; the
settings a Scheduler was not given come from ``dask.config``. ``get``, the embedded
default, reads ``dask.config`` at every compute: when the ``serverless`` settings changed
since its Scheduler was made, it makes a new one. ``import dask_serverless`` also
registers the name ``"serverless"`` with dask, so ``scheduler="serverless"`` works.

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
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import dask.base
import dask.config
import redis
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
from dask_serverless.constants import LARGE_LITERAL_BYTES
from dask_serverless.dashboard import Dashboard, start_dashboard
from dask_serverless.graph import as_task_graph, literal_values, requested_keys, translate
from dask_serverless.planning import Plan, Planner, Planning, Platform
from dask_serverless.protocol.keys import new_run_id
from dask_serverless.protocol.record import (
    LITERAL,
    RunRecord,
    RunSigner,
    seal_record,
    split_large_literals,
)
from dask_serverless.protocol.runs import RunHistory
from dask_serverless.protocol.store import RunStore, Scripts, connect, redact
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

_BACKEND_NAMES = ("local", "inline", "lambda")


def checked_number(
    name: str,
    value: Any,
    minimum: float,
    *,
    whole: bool = False,
    optional: bool = False,
    above: bool = False,
) -> Any:
    """``value`` when it is a number >= ``minimum`` (> with ``above``), else a ValueError
    that names the argument; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    kind = "whole number" if whole else "number"
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if valid and whole:
        valid = float(value).is_integer()
    if valid:
        valid = value > minimum if above else value >= minimum
    if not valid:
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        allowed = " or None" if optional else ""
        raise ValueError(f"Scheduler({name}={value!r}): {name} must be a {kind} {bound}{allowed}")
    return int(value) if whole else value


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
        checked = {
            "timeout": checked_number(
                "timeout", config.setting("timeout", timeout), 0, optional=True, above=True
            ),
            "run_ttl": checked_number("run_ttl", config.setting("run-ttl", run_ttl), 1, whole=True),
            "concurrency": checked_number(
                "concurrency",
                config.setting("local.concurrency", concurrency),
                1,
                whole=True,
                optional=True,
            ),
            "keep_alive": checked_number(
                "keep_alive", config.setting("local.keep-alive", keep_alive), 0
            ),
            "retries": checked_number("retries", config.setting("retries", retries), 0, whole=True),
            "retry_backoff": checked_number(
                "retry_backoff", config.setting("retry-backoff", retry_backoff), 0
            ),
            "lease_timeout": checked_number(
                "lease_timeout", config.setting("lease-timeout", lease_timeout), 0, above=True
            ),
            "max_output_bytes": checked_number(
                "max_output_bytes",
                config.setting("max-output-bytes", max_output_bytes),
                1,
                whole=True,
            ),
            "max_reinvocations": checked_number(
                "max_reinvocations",
                config.setting("max-reinvocations", max_reinvocations),
                0,
                whole=True,
            ),
        }
        for value in memory_configs or ():
            checked_number("memory_configs", value, 0, whole=True, above=True)
        chosen_backend = config.setting("backend", backend)
        if isinstance(chosen_backend, str) and chosen_backend not in _BACKEND_NAMES:
            raise ValueError(
                f"Scheduler(backend={chosen_backend!r}): backend must be one of "
                f"{', '.join(map(repr, _BACKEND_NAMES))} or a Backend object"
            )
        if secret is not None and not isinstance(secret, (bytes, str)):
            raise TypeError(
                f"Scheduler(secret=…): secret must be bytes or str, not {type(secret).__name__}"
            )
        url = config.setting("redis", redis)
        self.redis_url = redact(url) if url is not None else None
        if url is None:
            self._embedded = EmbeddedRedis(server=config.setting("embedded.server"))
            url = self._embedded.url
            self.redis_url = None
        try:
            self._redis = connect(url)
            self._scripts = Scripts(self._redis)
            self.timeout = checked["timeout"]
            self.run_ttl = checked["run_ttl"]
            self.retries = checked["retries"]
            self.retry_backoff = float(checked["retry_backoff"])
            self.lease_ms = int(float(checked["lease_timeout"]) * 1000)
            self.max_output_bytes = checked["max_output_bytes"]
            self.max_reinvocations = checked["max_reinvocations"]
            self.cluster_output_bytes = int(config.setting("cluster-output-bytes"))
            self.recovered_invocations = 0
            self.last_retries: dict[Any, int] = {}
            shared = secret.encode() if isinstance(secret, str) else secret
            self._secret = shared or config.secret_from_environment() or new_secret()
            self._signer = Signer(self._secret)
            options = dict(config.setting("local"))
            options["concurrency"] = checked["concurrency"]
            options["keep-alive"] = checked["keep_alive"]
            options["lambda"] = {
                "function": lambda_function,
                "endpoint-url": lambda_endpoint_url,
                "region": lambda_region,
            }
            self._backend = create_backend(chosen_backend, url, self._secret, options)
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

    def __repr__(self) -> str:
        backend = self._backend.name if self._backend is not None else "?"
        redis = self.redis_url or "embedded"
        concurrency = self._backend.concurrency if self._backend is not None else None
        state = " closed" if self._closed else ""
        return (
            f"<dask_serverless.Scheduler{state} backend={backend!r} redis={redis!r} "
            f"concurrency={concurrency} timeout={getattr(self, 'timeout', None)} "
            f"retries={getattr(self, 'retries', None)}>"
        )

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
        graph = as_task_graph(dsk)
        wanted = requested_keys(keys)
        results = literal_values(graph, wanted)
        computed = [key for key in wanted if key not in results]
        if computed:
            results.update(self.run(dsk, graph, computed, callbacks, timeout, parent_gone))
        return nested_get(keys, results)

    def run(
        self,
        dsk: Any,
        graph: dict,
        keys: list,
        callbacks: Any,
        timeout: float | None,
        parent_gone: Callable[[], bool] | None = None,
    ) -> dict:
        """Compute ``keys`` (none of them plain data) in one run; their values by key."""
        run_id = new_run_id()
        dag = translate(dsk, keys, run_token=run_id, graph=graph)
        try:
            plan = self._planning.plan(dag, self.platform())
        except (redis.ConnectionError, redis.TimeoutError) as error:
            # Planning reads the history: a Redis that is down (restarting) or hung fails
            # the compute before it starts, with the package's error naming the server.
            raise RedisUnavailableError(
                f"cannot reach Redis at {self.redis_url or 'the embedded server'} to plan "
                f"run {run_id}: {error}"
            ) from None
        bundling = plan.bundling
        workers_dag, literals = split_large_literals(dag, LARGE_LITERAL_BYTES)
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
            workers_dag,
            retries=self.retries,
            retry_backoff_s=self.retry_backoff,
            max_output_bytes=self.max_output_bytes,
            internal=bundling.internal,
            cluster_output_bytes=self.cluster_output_bytes,
            memory=plan.worker_memory(),
            concurrency=self.backend.concurrency,
            literals=frozenset(literals),
        )
        sealed = seal_record(self._signer, record)
        signer = RunSigner(self._signer, run_id)
        literal_blobs = {i: signer.dumps(v, LITERAL, i) for i, v in literals.items()}
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
                values = run.execute(sealed, limit, literal_blobs)
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
                run.progress.emit_warnings()
        logger.info(
            "run %s finished in %.3f s (%d invocations recovered)",
            run_id,
            makespan,
            run.recovered_invocations,
            extra={"run_id": run_id},
        )
        self._planning.finish(dag, plan, run.progress, out_of_memory=run.progress.out_of_memory)
        self._last_report = self._recorder.succeeded(
            run_id, dag, plan, run.progress, run_started, makespan, self.backend.throttled
        )
        return dict(zip((dag.keys[i] for i in dag.requested), values, strict=True))

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
    """Holds the process-wide Scheduler behind ``dask_serverless.get``, made on first use
    and made again when the ``serverless`` settings it was made with changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scheduler: Scheduler | None = None
        self._settings: dict | None = None

    def get(self) -> Scheduler:
        with self._lock:
            settings = dask.config.get("serverless")
            stale = self._scheduler is not None and settings != self._settings
            if stale and self._scheduler is not None:
                self._scheduler.close()
            if self._scheduler is None or self._scheduler._closed:
                self._scheduler = Scheduler()
                self._settings = copy.deepcopy(settings)
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


# ``scheduler="serverless"``: dask looks names up in this table.
dask.base.named_schedulers.setdefault("serverless", get)
