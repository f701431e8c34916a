"""The Scheduler: the long-lived façade a user hands to dask.

A Scheduler holds what outlives one compute — the Redis connection and its scripts, the
backend, the secret, the planner with its history, the settings — and turns every
``get`` into one ``Run`` (``client.run``):

1. answer the requested keys that are plain data itself, with the objects themselves
   (as dask's schedulers do), and translate the rest of the dask graph into a DAG (bad
   input and bad annotations fail here, before anything is sent);
2. plan it on the platform the backend is (``planning.Platform``), which decides the root
   bundles too — after placing in the client the tasks cheaper to run beside the large
   literals (persisted chunks) they read than to move those (``planning.locality``);
3. take the other large literals out of the record, store them under keys of their own,
   and seal (pickle and sign) the run record, so an unpicklable task also fails before
   dispatch; warnings the tasks raised are re-emitted after the run;
4. hand the run to a ``Run``, which stores the record, invokes the roots, runs the tasks
   placed in the client (``client.placed``) and listens, and drive the dask callbacks
   around it;
5. record the run's measurements in history and keep its report for ``last_run`` — also
   when the run failed, timed out or was cancelled (``dask_serverless.recording``).

Every argument is checked when the Scheduler is made, with an error that names it; the
settings a Scheduler was not given come from ``dask.config``, read again at every compute
(``client.settings``): a changed setting applies to the next compute, and one that changes
what the Scheduler started (its Redis, backend, secret, dashboard) restarts those first.
``get``, the embedded default, is one such Scheduler, made on first use.
``import dask_serverless`` also registers the name ``"serverless"`` with dask, so
``scheduler="serverless"`` works.

``get``, the embedded default, called inside a task (a worker runs it) starts a *nested*
run instead: a child run on the worker's own Redis and platform, through a Scheduler the
worker keeps for its tasks. A ``Scheduler(...)`` made inside a task without a Redis or
backend of its own is such a Scheduler too (its other arguments apply to its runs).
While the task waits, its instance secedes from the platform's concurrency
(``seceded``), so a fan-out decided at run time cannot deadlock the limit; the child
run's error is raised in the task, and the child run stops (deleting its keys) if the
parent run goes away.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask.base
import dask.config
import redis
from dask.callbacks import local_callbacks
from dask.local import nested_get

from dask_serverless import config, logs
from dask_serverless.backends import create_backend
from dask_serverless.backends.base import Backend
from dask_serverless.client.placed import ClientWorkers
from dask_serverless.client.progress import RunProgress
from dask_serverless.client.run import (
    RedisUnavailableError,
    Run,
    RunKeeper,
    StuckRunError,
    WorkerCrashedError,
)
from dask_serverless.client.settings import Resources, RunSettings, resolve
from dask_serverless.constants import LARGE_LITERAL_BYTES
from dask_serverless.dashboard import Dashboard, start_dashboard
from dask_serverless.graph import as_task_graph, literal_values, requested_keys, translate
from dask_serverless.planning import Plan, Planner, Planning, Platform
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.keys import new_run_id
from dask_serverless.protocol.record import (
    LITERAL,
    RunRecord,
    RunSigner,
    literal_bytes,
    seal_record,
    split_large_literals,
)
from dask_serverless.protocol.runs import RunHistory
from dask_serverless.protocol.store import Client, RunStore, Scripts, connect, redact
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
    from ``dask.config``'s ``serverless.*`` settings, read at every compute. Made inside a
    task without ``redis`` or ``backend``, it computes nested runs on the worker's Redis
    and platform, like ``dask_serverless.get`` there. Use it as
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
        client_tasks: bool | None = None,
    ) -> None:
        logs.configure()
        self._closed = False
        self._dashboard: Dashboard | None = None
        self._embedded: EmbeddedRedis | None = None
        self._backend: Backend | None = None
        self._client_workers: ClientWorkers | None = None
        self._redis: Client | None = None
        self._recorder: RunRecorder | None = None
        self._last_report: Callable[[], RunReport | None] | None = None
        self.recovered_invocations = 0
        self.last_retries: dict[Any, int] = {}
        self._keeper = RunKeeper()
        # What it was given; the rest is read from dask.config at every compute.
        self._arguments: dict[str, Any] = {
            "redis": redis,
            "backend": backend,
            "timeout": timeout,
            "run_ttl": run_ttl,
            "secret": secret,
            "concurrency": concurrency,
            "keep_alive": keep_alive,
            "retries": retries,
            "retry_backoff": retry_backoff,
            "lease_timeout": lease_timeout,
            "max_reinvocations": max_reinvocations,
            "max_output_bytes": max_output_bytes,
            "lambda_function": lambda_function,
            "lambda_endpoint_url": lambda_endpoint_url,
            "lambda_region": lambda_region,
            "planner": planner,
            "sla": sla,
            "deadline": deadline,
            "memory_configs": memory_configs,
            "history": history,
            "dashboard": dashboard,
            "client_tasks": client_tasks,
        }
        # Made inside a task without a Redis or backend of its own: nested runs on the
        # worker's Redis and platform (``_as_child``), which it borrows and never stops.
        invocation = serving()
        self._nested = invocation is not None and redis is None and backend is None
        if invocation is not None and self._nested:
            environment = invocation.environment
            if not isinstance(environment.invoker, Backend):
                raise RuntimeError(
                    f"this worker's platform ({type(environment.invoker).__name__}) cannot "
                    "start nested runs"
                )
            self._arguments.update(
                redis=environment.redis_url,
                backend=environment.invoker,
                secret=environment.secret,
                dashboard=False,  # a worker serves no pages; the parent's dashboard sees it
            )
        # Computes in progress, and the lock a restart waits on until there are none.
        self._active = 0
        self._state = threading.Condition()
        self._resources: Resources | None = None
        self._runs: RunSettings | None = None
        settings = resolve(self._arguments)
        try:
            self._start(settings.resources)
            self._apply(settings.runs)
        except BaseException:
            self.close()
            raise

    def _start(self, resources: Resources) -> None:
        """Start Redis (embedded, or connect to the URL), the backend and the dashboard."""
        url = resources.redis
        self.redis_url = redact(url) if url is not None else None
        if url is None:
            self._embedded = EmbeddedRedis(server=resources.embedded_server)
            url = self._embedded.url
        self._url = url
        self._redis = connect(url, resources.redis_cluster)
        self._scripts = Scripts(self._redis)
        if resources.secret is not None:
            self._secret = resources.secret
        elif self._resources is None or self._resources.secret is not None:
            self._secret = new_secret()  # kept while the Scheduler lives
        self._signer = Signer(self._secret)
        options = {**resources.local, "lambda": resources.lambda_options}
        self._backend = create_backend(resources.backend, url, self._secret, options)
        workers = self._backend.concurrency or _UNKNOWN_CONCURRENCY
        self.bundles = int(workers) * _BUNDLES_PER_WORKER
        if resources.dashboard:
            self._dashboard = start_dashboard(url, resources.dashboard_port)
            print(f"dask-serverless dashboard: {self._dashboard.url}")
        self._resources = resources
        self._runs = None  # planning and run history are made again on the new Redis

    def _apply(self, runs: RunSettings) -> None:
        """Shape the next runs by ``runs``: planning and run history are made again when
        their settings changed."""
        previous, self._runs = self._runs, runs
        self.timeout = runs.timeout
        self.run_ttl = runs.run_ttl
        self.retries = runs.retries
        self.retry_backoff = runs.retry_backoff_s
        self.lease_ms = runs.lease_ms
        self.max_output_bytes = runs.max_output_bytes
        self.max_reinvocations = runs.max_reinvocations
        self.cluster_output_bytes = runs.cluster_output_bytes
        self.client_tasks = runs.client_tasks
        same = previous is not None and previous.planning == runs.planning
        if same and previous is not None and previous.history_runs == runs.history_runs:
            return
        # Planning (dask_serverless.planning): per-task memory from history, the SLA.
        self._planning = Planning(self._redis, **runs.planning)
        # Run history and reports of failed runs (dask_serverless.recording).
        if self._recorder is not None:
            self._recorder.close()
        keep_runs = runs.history_runs
        ttl_s = runs.planning["history_ttl_s"]
        self._recorder = RunRecorder(
            RunHistory(self.redis, keep_runs, ttl_s) if keep_runs > 0 else None,
            self._planning.pricing,
        )

    def _stop(self, closing: bool = False) -> None:
        """Stop what ``_start`` started. A Backend object given as argument is closed only
        with the Scheduler (``closing``), and a borrowed one (nested) never."""
        if self._dashboard is not None:
            self._dashboard.stop()
            self._dashboard = None
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        if self._client_workers is not None:
            self._client_workers.close()
            self._client_workers = None
        if self._backend is not None:
            given = not isinstance(self._arguments["backend"], str | None)
            if not self._nested and (closing or not given):
                self._backend.close()
            self._backend = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        """One compute: read the settings again (restarting what they changed once no
        other compute is in progress), and count the compute while it runs."""
        settings = resolve(self._arguments)
        with self._state:
            if self._closed:
                raise RuntimeError("this Scheduler is closed")
            if settings.resources != self._resources:
                while self._active:
                    self._state.wait()
                logger.info("settings changed: restarting the Scheduler's Redis and backend")
                self._stop()
                self._start(settings.resources)
            self._apply(settings.runs)
            self._active += 1
        try:
            yield
        finally:
            with self._state:
                self._active -= 1
                self._state.notify_all()

    @property
    def recorder(self) -> RunRecorder:
        assert self._recorder is not None
        return self._recorder

    @property
    def redis(self) -> Client:
        assert self._redis is not None
        return self._redis

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
            with self._computing(), self._as_child(parent_gone) as parent:
                results.update(self.run(dsk, graph, computed, callbacks, timeout, parent))
        return nested_get(keys, results)

    @contextlib.contextmanager
    def _as_child(
        self, parent_gone: Callable[[], bool] | None
    ) -> Iterator[Callable[[], bool] | None]:
        """For a Scheduler made inside a task: the compute is a child run of the task
        running now, which secedes from the platform's concurrency while it waits, and
        whose run going away stops the child run. Otherwise nothing changes."""
        if not self._nested:
            yield parent_gone
            return
        invocation = serving()
        if invocation is None:
            raise RuntimeError(
                "this Scheduler was made inside a task, for nested runs of the worker's "
                "platform: it computes only inside a task"
            )
        seceded = getattr(self.backend, "seceded", contextlib.nullcontext)
        with seceded():
            yield parent_gone or invocation.cancelled

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
        workers_dag, literals = split_large_literals(dag, LARGE_LITERAL_BYTES)
        try:
            plan = self._planning.plan(dag, self.platform(), self.literal_sizes(literals))
        except (redis.ConnectionError, redis.TimeoutError) as error:
            # Planning reads the history: a Redis that is down (restarting) or hung fails
            # the compute before it starts, with the package's error naming the server.
            raise RedisUnavailableError(
                f"cannot reach Redis at {self.redis_url or 'the embedded server'} to plan "
                f"run {run_id}: {error}"
            ) from None
        placement = plan.inputs.placement
        bundling = placement.bundling(dag, plan.bundling)
        literals = {i: v for i, v in literals.items() if i not in placement.nodes}
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
            keep_local_s=plan.inputs.one_invocation_s(plan.memory_mb),
        )
        sealed = seal_record(self._signer, record)
        signer = RunSigner(self._signer, run_id)
        literal_blobs = {i: signer.dumps(v, LITERAL, i) for i, v in literals.items()}
        limit = self.timeout if timeout is None else timeout

        def serve_here(invocation: Invocation) -> tuple[Any, ...] | None:
            return self.client_workers.serve(record, dag, invocation, placement.nodes)

        with local_callbacks(callbacks) as active:
            run = Run(
                dag=dag,
                bundling=bundling,
                plan=plan,
                record=record,
                store=RunStore(self.redis, run_id, self.run_ttl, self._scripts),
                progress=RunProgress(dag, callbacks=active),
                backend=self.backend,
                signer=RunSigner(self._signer, run_id),
                lease_ms=self.lease_ms,
                max_reinvocations=self.max_reinvocations,
                parent_gone=parent_gone,
                keeper=self._keeper,
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
            self.recorder.started(run_id, dag, plan, run.progress, run_started)
            try:
                run.progress.start()
                if plan.prewarm:
                    self.backend.prewarm(dict(plan.prewarm))
                run_started = time.time()
                values = run.execute(sealed, limit, literal_blobs, placement.roots, serve_here)
                makespan = time.time() - run_started
                succeeded = True
            except BaseException as error:
                logger.info("run %s failed: %r", run_id, error, extra={"run_id": run_id})
                self._last_report = self.recorder.ended_with(
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
        self._last_report = self.recorder.succeeded(
            run_id, dag, plan, run.progress, run_started, makespan, self.backend.throttled
        )
        return dict(zip((dag.keys[i] for i in dag.requested), values, strict=True))

    def literal_sizes(self, literals: dict[int, Any]) -> dict[int, int] | None:
        """Bytes of literal data of the nodes carrying large literals, for the planner to
        place tasks beside them in the client (``planning.locality``); None when
        ``client_tasks`` is off."""
        if not literals or not self.client_tasks:
            return None
        return {i: literal_bytes(node, sys.maxsize) for i, node in literals.items()}

    @property
    def client_workers(self) -> ClientWorkers:
        """Where the tasks placed in the client run (made on first use)."""
        if self._client_workers is None:
            self._client_workers = ClientWorkers(self._url, self._secret, self.backend)
        return self._client_workers

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
        dag = translate(dsk, keys)
        _, literals = split_large_literals(dag, LARGE_LITERAL_BYTES)
        with self._computing():
            return self._planning.plan(dag, self.platform(), self.literal_sizes(literals))

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
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._keeper.close()
            self._stop(closing=True)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _DefaultScheduler:
    """Holds the process-wide Scheduler behind ``dask_serverless.get``, made on first use
    (it reads ``dask.config`` at every compute, as every Scheduler does)."""

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
    """Compute ``keys`` as a child run of the task ``invocation`` is running, through the
    Scheduler the worker keeps for its tasks' nested runs (made in a task, it nests)."""
    environment = invocation.environment
    if environment.nested_client is None:
        environment.nested_client = Scheduler()
    return environment.nested_client.get(dsk, keys, **kwargs)


# ``scheduler="serverless"``: dask looks names up in this table.
dask.base.named_schedulers.setdefault("serverless", get)
