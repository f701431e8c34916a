"""Planning: from history to a plan before a run, from measurements to history after it.

A Scheduler owns one ``Planning``. Before a run, ``plan(dag, platform)`` loads the
bounded history of the DAG's functions (one Redis round trip; see ``protocol.history``),
builds a ``Predictor``, predicts every node at every configuration and asks the planner
for a ``Plan`` on the platform the run goes to (``simulate.Platform``: its concurrency
slots, root bundles, warm instances, shared cores, and the CPUs of them the machine's
other load left the last runs: ``history.recent_capacity``). Tasks annotated with
``dask.annotate(memory=MB)`` keep that configuration (rounded up to a configured size).

Where annotations survive: ``dask.delayed`` graphs keep them. Array graphs keep them only
without blockwise fusion — ``dask.config.set({"optimization.fuse.active": False})`` or
``compute(..., optimize_graph=False)``; bag graphs only with ``optimize_graph=False``
(their optimisation rebuilds the graph without layers); dask-expr dataframes ignore
annotations altogether.

After a successful run, ``finish`` turns the workers' metrics into history samples (and
the sizes tasks ran out of memory at, and — on a machine the instances share — the CPUs
the run got) and appends them; the run's report (``report``, built by the recorder) puts
the plan next to what was measured — the cost billed as Lambda bills
(``report.Pricing``), by the same formula as the prediction.

Nothing is shared between Schedulers: each has its own Planning, and every plan its own
history snapshot and predictor.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis

from dask_serverless.constants import CLIENT_WORKER, MEMORY_SIZES_MB
from dask_serverless.graph import DAG
from dask_serverless.planning.history import (
    History,
    InvocationMetrics,
    TaskMetrics,
    cpu_capacity,
    first_task_starts,
    function_identities,
    invocation_metrics,
    literal_bytes,
    measured_tasks,
    recent_capacity,
    run_samples,
    task_metrics,
)
from dask_serverless.planning.locality import ClientPlacement, place_in_client
from dask_serverless.planning.planners import (
    CriticalPathPlanner,
    Plan,
    PlanInputs,
    Planner,
    PlanWarning,
    UniformPlanner,
    WukongPlanner,
    make_planner,
)
from dask_serverless.planning.predict import CpuModel, Predictor
from dask_serverless.planning.simulate import NodeCosts, Platform, Schedule, Timeline
from dask_serverless.planning.sla import SLA, Deadline
from dask_serverless.protocol.history import HistoryStore
from dask_serverless.report import Pricing, RunReport, TaskRecord

__all__ = [
    "SLA",
    "ClientPlacement",
    "CpuModel",
    "CriticalPathPlanner",
    "Deadline",
    "History",
    "NodeCosts",
    "Plan",
    "PlanInputs",
    "PlanWarning",
    "Planner",
    "Planning",
    "Platform",
    "Predictor",
    "Pricing",
    "Schedule",
    "Timeline",
    "UniformPlanner",
    "WukongPlanner",
    "make_planner",
    "pinned_memory",
]

DEFAULT_CONFIGS = MEMORY_SIZES_MB
# Tasks planned shorter than this do not calibrate their function (their ratio is noise).
MIN_CALIBRATED_S = 0.01


def parse_memory_configs(configs: Sequence[int] | None) -> tuple[int, ...]:
    """The sorted, de-duplicated configurations; ValueError for an empty or bad list."""
    values = tuple(sorted({int(m) for m in (configs or DEFAULT_CONFIGS)}))
    if not values or values[0] <= 0:
        raise ValueError(f"memory configurations must be positive MB, got {configs!r}")
    return values


def pinned_memory(dag: DAG, configs: Sequence[int]) -> dict[int, int]:
    """Nodes annotated with ``memory=MB``, each rounded up to a configuration."""
    pinned: dict[int, int] = {}
    for index, value in dag.annotations.get("memory", {}).items():
        wanted = int(value)
        fitting = [m for m in configs if m >= wanted]
        if not fitting:
            raise ValueError(
                f"task {dag.keys[index]!r} is annotated with memory={value}, more than the "
                f"largest configuration {max(configs)} MB"
            )
        pinned[index] = fitting[0]
    return pinned


class Planning:
    """A Scheduler's planner, SLA, configurations and history (see module docstring)."""

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster | None,
        *,
        planner: str | Planner | None = None,
        sla: str | SLA | None = "p95",
        deadline: float | str | Deadline | None = None,
        memory_configs: Sequence[int] | None = None,
        history: bool = True,
        history_samples: int = 256,
        history_ttl_s: int = 30 * 86400,
        cpu: CpuModel | None = None,
        min_work_s: float = 0.0,
        platform: Platform | None = None,
        pricing: Pricing | dict | None = None,
    ) -> None:
        self.planner = make_planner(planner)
        self.sla = SLA.parse(sla)
        self.deadline = Deadline.parse(deadline)
        self.configs = parse_memory_configs(memory_configs)
        self.cpu = cpu or CpuModel()
        self.min_work_s = min_work_s
        self.platform = platform or Platform()
        self.pricing = Pricing.parse(pricing)
        self.store = (
            HistoryStore(client, history_samples, history_ttl_s)
            if history and client is not None
            else None
        )

    def load_history(self, functions: Sequence[str]) -> History:
        if self.store is None:
            return History()
        return History(*self.store.load((f for f in functions if f), self.configs))

    def inputs(
        self,
        dag: DAG,
        functions: Sequence[str] | None = None,
        platform: Platform | None = None,
    ) -> PlanInputs:
        if functions is None:
            functions = function_identities(dag)
        history = self.load_history(sorted(set(functions)))
        predictor = Predictor(history, self.sla, self.cpu)
        platform = platform or self.platform
        if platform.cores is not None:
            capacity = recent_capacity(history.capacity, time.time())
            if capacity is not None and capacity < platform.cores:
                platform = replace(platform, capacity=capacity)
        return PlanInputs(
            dag=dag,
            functions=functions,
            predictor=predictor,
            configs=self.configs,
            sla=self.sla,
            deadline=self.deadline,
            pinned=pinned_memory(dag, self.configs),
            min_work_s=self.min_work_s,
            platform=platform,
            pricing=self.pricing,
            literals=literal_bytes(dag),
        )

    def plan(
        self,
        dag: DAG,
        platform: Platform | None = None,
        literal_sizes: Mapping[int, int] | None = None,
    ) -> Plan:
        """The plan of ``dag`` on ``platform``. Given ``literal_sizes`` (bytes of the nodes
        carrying large literal data), tasks that are cheaper to run beside that data than
        to move it are placed in the client first (``planning.locality``) and the planner
        plans the rest."""
        inputs = self.inputs(dag, platform=platform)
        if literal_sizes:
            placement = place_in_client(dag, literal_sizes, inputs.predictor, inputs.functions)
            inputs = replace(inputs, placement=placement)
        plan = self.planner.plan(inputs)
        notes = (*plan.notes, inputs.placement.note()) if inputs.placement else plan.notes
        platform = inputs.platform
        if platform.capacity is not None and platform.cores is not None:
            notes = (
                *notes,
                f"the machine's other load leaves this backend {platform.capacity:.2f} of its "
                f"{platform.cores:g} cores: predicted on those, sizes chosen on all",
            )
        return replace(plan, functions=inputs.functions, notes=notes)

    def finish(
        self,
        dag: DAG,
        plan: Plan,
        progress: Any,
        out_of_memory: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Record the run's metrics in history (the run's report is the recorder's).

        Only the newest ``history_samples`` tasks of each function become samples: history
        keeps no more. The run-wide figures read every task: when each invocation's first
        task began (its setup, see ``run_samples``) and, on a machine the instances share,
        the CPUs the run got (``cpu_capacity``). ``out_of_memory`` lists ``(task, MB)`` of
        tasks that ran out of memory at that size (and were retried one size up): history
        keeps the size, so no later plan goes there.
        """
        if self.store is None:
            return
        uploads: dict[int, float] = getattr(progress, "uploads", {})
        started = [invocation_metrics(e) for e in getattr(progress, "invocations", [])]
        # The client's own invocations start no instance: no start-up to learn from.
        invocations = [i for i in started if not i.worker_id.startswith(CLIENT_WORKER)]
        functions = plan.functions or function_identities(dag)
        newest = newest_per_function(progress.task_events, functions, self.store.samples)
        sampled = [
            metrics
            for event in newest
            if (metrics := task_metrics(event, uploads.get(int(event[1]), 0.0))) is not None
        ]
        ooms: dict[str, list[int]] = {}
        for index, memory_mb in out_of_memory:
            ooms.setdefault(functions[index], []).append(int(memory_mb))
        # Every task (not only the newest per function): an invocation's first task and
        # the CPU the whole run got.
        measured = measured_tasks(progress.task_events, uploads).values()
        capacity = None
        cpus = None
        cores = plan.inputs.platform.cores
        if cores is not None:
            cpus = cpu_capacity(measured, cores, self.cpu)
            if cpus is not None:
                capacity = [round(time.time(), 3), round(cpus, 4)]
        first_starts = first_task_starts(measured)
        self.store.append(
            *run_samples(functions, sampled, invocations, plan.inputs.literals, first_starts, cpus),
            ooms,
            residuals(plan, functions, sampled),
            capacity,
        )


def residuals(
    plan: Plan, functions: Sequence[str], tasks: Sequence[TaskMetrics]
) -> dict[str, list[float]]:
    """Per function, measured / planned work of its tasks, times the bias the plan used
    (so each is relative to the uncalibrated model).

    Work is what the execution model predicts: CPU seconds plus the time spent neither
    computing nor waiting for a CPU (I/O, sleeping). Waiting for a CPU — a small share's
    throttling, other instances and the machine's other load — is the platform model's
    business (speed, shared cores, capacity), so it is left out of both sides: a busy
    machine does not make the next plan expect every task to be slower on top of the
    capacity it measured. Without CPU times, measured / planned busy time. Only plans
    with predictions count, and only tasks the plan gave real time: a millisecond task's
    ratio is noise.
    """
    if not plan.inputs.per_node:
        return {}
    predictor = plan.inputs.predictor
    costs = plan.inputs.costs
    found: dict[str, list[float]] = {}
    for task in tasks:
        i = task.index
        predicted = plan.predicted_s(i)
        if predicted < MIN_CALIBRATED_S or task.total_s <= 0:
            continue
        planned_work = costs.cpu_s[i][0] + costs.io_s[i][0] if costs.cpu_s else 0.0
        if task.cpu_s is not None and planned_work >= MIN_CALIBRATED_S:
            work = task.cpu_s + max(0.0, task.exec_s - task.cpu_s - task.wait_s)
            ratio = predictor.bias(functions[i]) * work / planned_work
        else:
            ratio = predictor.bias(functions[i]) * task.total_s / predicted
        found.setdefault(functions[i], []).append(round(ratio, 4))
    return found


def newest_per_function(
    events: Sequence[Sequence[Any]], functions: Sequence[str], limit: int
) -> list[Sequence[Any]]:
    """At most ``limit`` of the newest ``done`` events of each function, oldest first."""
    taken: dict[str, int] = {}
    kept = []
    for event in reversed(events):
        function = functions[int(event[1])]
        if taken.get(function, 0) < limit:
            taken[function] = taken.get(function, 0) + 1
            kept.append(event)
    kept.reverse()
    return kept


def report(
    run_id: str,
    dag: DAG,
    plan: Plan,
    measured: dict[int, TaskMetrics],
    invocations: Sequence[InvocationMetrics],
    started_unix: float,
    makespan_s: float,
    throttled: bool | None,
    pricing: Pricing,
    out_of_memory_retries: int = 0,
) -> RunReport:
    tasks = []
    placed = plan.inputs.placement.nodes
    for i in range(dag.sink):
        m = measured.get(i)
        actual_start = None if m is None else m.start - started_unix
        if i in placed:
            memory_mb = None  # the client's own process: no configuration, not billed
        else:
            memory_mb = plan.memory_mb[i] if m is None or m.memory_mb is None else m.memory_mb
        tasks.append(
            TaskRecord(
                key=dag.keys[i],
                memory_mb=memory_mb,
                predicted_s=plan.predicted_s(i),
                actual_s=None if m is None else m.total_s,
                on_critical_path=plan.on_critical_path(i),
                predicted_start_s=plan.start_s[i],
                predicted_finish_s=plan.finish_s[i],
                actual_start_s=actual_start,
                actual_finish_s=None
                if m is None or actual_start is None
                else actual_start + m.total_s,
                worker_id=None if m is None else m.worker_id,
                cold=None if m is None else m.cold,
            )
        )
    platform = [inv for inv in invocations if not inv.worker_id.startswith(CLIENT_WORKER)]
    bill = pricing.bill(billed_invocations(measured.values(), platform))
    timeline = plan.timeline
    return RunReport(
        run_id=run_id,
        planner=plan.planner,
        sla=plan.sla,
        tasks=tasks,
        predicted_makespan_s=plan.predicted_makespan_s,
        actual_makespan_s=makespan_s,
        predicted_cost_gb_s=plan.predicted_cost_gb_s,
        cost_gb_s=bill.gb_s,
        invocations=len(platform),
        cold_starts=sum(1 for inv in platform if inv.cold),
        throttled=throttled,
        target_s=plan.target_s,
        notes=plan.notes,
        predicted_cost_usd=plan.predicted_cost_usd,
        cost_usd=bill.usd,
        predicted_invocations=len(timeline.invocations),
        predicted_cold_starts=timeline.cold_starts,
        predicted_quantile_s=None if plan.sla == "average" else plan.quantile_s,
        out_of_memory_retries=out_of_memory_retries,
    )


def billed_invocations(
    tasks: Iterable[TaskMetrics], invocations: Sequence[InvocationMetrics]
) -> list[tuple[int | None, float]]:
    """``(MB, billed seconds)`` of every measured invocation, as Lambda bills them.

    An invocation's duration runs from its handler's start to the end of its last task
    (download, execution, upload), plus its initialisation when it started cold.
    """
    ends: dict[str, float] = {}
    for task in tasks:
        if task.invocation_id:
            end = task.start + task.total_s
            ends[task.invocation_id] = max(ends.get(task.invocation_id, end), end)
    billed = []
    for inv in invocations:
        end = ends.get(inv.invocation_id, inv.start)
        duration = max(0.0, end - inv.start) if inv.start else 0.0
        billed.append((inv.memory_mb, duration + (inv.startup_s if inv.cold else 0.0)))
    return billed
