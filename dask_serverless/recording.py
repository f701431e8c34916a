"""What a Scheduler keeps of each run: its report, in memory and in the run history.

A run is *recorded* twice. While it runs, its planned report (every task with its
function, configuration, dependencies and planned times; state ``running``) goes to the
run history (``protocol.runs``), which is how a dashboard learns the shape of a run in
progress — the workers' event stream only carries task numbers. When it ends, whatever
the outcome, the report with what was measured replaces it.

Building a report costs time in proportion to the run's tasks, so none is built on the
compute's path:

* the planned report is built by a background thread, and only for a run still going
  ``RUNNING_REPORT_AFTER_S`` after it started: a shorter run is over before a dashboard
  (which polls about once a second) could show it running, and its final report follows
  at once;
* a run that succeeded gets a report built on first use (``sched.last_run``) and saved
  to the history by the same background thread, so the compute returns without waiting
  for a 10 000-row report to be built and written. Reports are saved in the order the
  runs started; a new run waits only while more than one earlier report is still
  unsaved, so saving keeps up with computes without holding each of them;
* a run that failed, timed out or was cancelled gets its report at once, attached to the
  raised exception as ``run_report`` and kept as ``sched.last_run``: tasks the client
  heard of are ``done`` (with their measurements), the failing task ``failed``, a task
  that raised and was being retried ``retried``, the rest ``waiting``.

Every report is also handed to the ``performance_report`` blocks the calling context is
in (``dask_serverless.performance``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import redis

from dask_serverless import performance
from dask_serverless.graph import DAG
from dask_serverless.planning import Plan, report
from dask_serverless.planning.history import (
    function_identities,
    invocation_metrics,
    measured_tasks,
)
from dask_serverless.protocol.runs import RunHistory
from dask_serverless.report import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    InvocationRecord,
    Pricing,
    RunReport,
    TaskRecord,
)

logger = logging.getLogger(__name__)

_ERROR_CHARS = 500
# Distinct functions a run's summary names (what `dask-serverless history` searches).
_FUNCTIONS_LISTED = 100
# A run still going this long after its start gets its planned report saved (see above).
RUNNING_REPORT_AFTER_S = 0.5
# Unsaved reports of earlier runs a new run lets pass before it waits for them.
_UNSAVED_REPORTS = 1


def outcome_of(error: BaseException, progress: Any) -> str:
    """``failed``, ``timed out`` or ``cancelled``: how a run that raised ``error`` ended."""
    if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
        return CANCELLED
    if isinstance(error, TimeoutError) and progress.failed_index is None:
        return TIMED_OUT
    return FAILED


def build_report(
    run_id: str,
    dag: DAG,
    plan: Plan,
    progress: Any,
    started_unix: float,
    makespan_s: float,
    throttled: bool | None = None,
    status: str = SUCCEEDED,
    error: str | None = None,
    pricing: Pricing | None = None,
) -> RunReport:
    """The full report of a run from its plan and the events the client received."""
    measured = measured_tasks(progress.task_events, progress.uploads)
    invocations = [invocation_metrics(e) for e in progress.invocations]
    base = report(
        run_id,
        dag,
        plan,
        measured,
        invocations,
        started_unix,
        makespan_s,
        throttled,
        pricing or Pricing(),
        len(progress.out_of_memory),
    )
    functions = plan.functions or function_identities(dag)
    tasks = []
    for index, task in enumerate(base.tasks):
        m = measured.get(index)
        retries = progress.retries.get(index, 0)
        tasks.append(
            TaskRecord(
                key=task.key,
                memory_mb=task.memory_mb,
                predicted_s=task.predicted_s,
                actual_s=task.actual_s,
                on_critical_path=task.on_critical_path,
                predicted_start_s=task.predicted_start_s,
                predicted_finish_s=task.predicted_finish_s,
                actual_start_s=task.actual_start_s,
                actual_finish_s=task.actual_finish_s,
                worker_id=task.worker_id,
                cold=task.cold,
                function=functions[index],
                input_bytes=None if m is None else m.input_bytes,
                output_bytes=None if m is None else m.output_bytes,
                retries=retries,
                state=_task_state(index, progress, retries),
                dependencies=tuple(dag.dependencies[index]),
            )
        )
    return replace(
        base,
        tasks=tasks,
        status=status,
        error=error,
        started_unix=started_unix,
        invocation_records=tuple(
            InvocationRecord(i.worker_id, i.memory_mb, i.cold, float(i.startup_s))
            for i in invocations
        ),
    )


def _task_state(index: int, progress: Any, retries: int) -> str:
    if index in progress.seen:
        return "done"
    if index == progress.failed_index:
        return "failed"
    return "retried" if retries else "waiting"


def summary_of(report: RunReport) -> dict[str, Any]:
    """The one-line record ``dask-serverless runs`` lists."""
    return {
        "run_id": report.run_id,
        "started": report.started_unix,
        "status": report.status,
        "tasks": len(report.tasks),
        "planner": report.planner,
        "sla": report.sla,
        "predicted_makespan_s": report.predicted_makespan_s,
        "actual_makespan_s": report.actual_makespan_s,
        "cost_gb_s": report.cost_gb_s,
        "functions": sorted({t.function for t in report.tasks if t.function})[:_FUNCTIONS_LISTED],
    }


class RunRecorder:
    """Records a Scheduler's runs (see module docstring); ``history=None`` keeps none."""

    def __init__(self, history: RunHistory | None, pricing: Pricing | None = None) -> None:
        self.history = history
        self.pricing = pricing
        self._saving = ThreadPoolExecutor(1, thread_name_prefix="dask-serverless-history")
        self._pending: list[Future] = []
        self._closed = False
        # Set when a run ends: its planned report is no longer worth building.
        self._ended: dict[str, threading.Event] = {}
        # Computes may run from several threads at once; they share the pending saves.
        self._lock = threading.Lock()

    def started(
        self, run_id: str, dag: DAG, plan: Plan, progress: Any, started_unix: float
    ) -> None:
        """Have the run's planned report saved should the run last long enough for a
        dashboard to follow it (``RUNNING_REPORT_AFTER_S``); see the module docstring."""
        if self.history is None:
            return
        self.flush(keep=_UNSAVED_REPORTS)
        ended = threading.Event()
        with self._lock:
            self._ended[run_id] = ended

        def planned() -> RunReport | None:
            if ended.wait(max(0.0, started_unix + RUNNING_REPORT_AFTER_S - time.time())):
                return None
            return build_report(
                run_id,
                dag,
                plan,
                progress.__class__(dag),
                started_unix,
                0.0,
                status=RUNNING,
                pricing=self.pricing,
            )

        self._submit(planned)

    def _end(self, run_id: str) -> None:
        with self._lock:
            ended = self._ended.pop(run_id, None)
        if ended is not None:
            ended.set()

    def succeeded(
        self,
        run_id: str,
        dag: DAG,
        plan: Plan,
        progress: Any,
        started_unix: float,
        makespan_s: float,
        throttled: bool | None,
    ) -> Callable[[], RunReport]:
        """How to build the report of a run that succeeded; saved in the background."""
        self._end(run_id)
        build = functools.cache(
            lambda: build_report(
                run_id,
                dag,
                plan,
                progress,
                started_unix,
                makespan_s,
                throttled,
                pricing=self.pricing,
            )
        )
        performance.collect(build)
        if self.history is not None:
            self._submit(build)
        return build

    def ended_with(
        self,
        error: BaseException,
        run_id: str,
        dag: DAG,
        plan: Plan,
        progress: Any,
        started_unix: float,
        throttled: bool | None,
    ) -> Callable[[], RunReport | None]:
        """The report of a run that raised ``error``, attached to it and saved.

        Building it never replaces ``error``: if that fails, the run has no report.
        """
        self._end(run_id)
        status = outcome_of(error, progress)
        reason = f"{type(error).__name__}: {error}"[:_ERROR_CHARS]
        try:
            built = build_report(
                run_id,
                dag,
                plan,
                progress,
                started_unix,
                time.time() - started_unix,
                throttled,
                status=status,
                error=reason,
                pricing=self.pricing,
            )
        except Exception:
            logger.warning("could not build the report of run %s", run_id, exc_info=True)
            return lambda: None
        try:
            error.run_report = built  # type: ignore[attr-defined]
        except AttributeError:
            logger.debug("cannot attach the run report to %r", error)
        performance.collect(lambda: built)
        if self.history is not None:
            self._submit(lambda: built)
        return lambda: built

    def _submit(self, build: Callable[[], RunReport | None]) -> None:
        with self._lock:
            if self._closed:
                return  # a compute that outlived its Scheduler's close: nothing is saved
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._saving.submit(self._save, build))

    def _save(self, build: Callable[[], RunReport | None]) -> None:
        """Build and store one report (none when ``build`` gives none). Seeing a run must
        never break computing one, so a failure here is logged, not raised."""
        assert self.history is not None
        try:
            built = build()
            if built is None:
                return
            self.history.save(
                built.run_id,
                built.started_unix or time.time(),
                json.dumps(summary_of(built)),
                built.to_json(),
            )
        except (redis.RedisError, OSError) as error:
            logger.warning("could not save a run report in the run history: %s", error)
        except Exception:
            logger.exception("could not build a run report for the run history")

    def flush(self, keep: int = 0) -> None:
        """Wait until every report handed over so far but the newest ``keep`` is saved."""
        with self._lock:
            pending = [f for f in self._pending if not f.done()]
            waited = pending[: max(0, len(pending) - keep)]
            self._pending = pending
        for future in waited:
            future.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ended, self._ended = list(self._ended.values()), {}
        for event in ended:
            event.set()
        self.flush()
        self._saving.shutdown(wait=True)
