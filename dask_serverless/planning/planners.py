"""Planners: give every task a configuration (memory MB) so the run meets its SLA cheaply.

A planner gets ``PlanInputs`` — the DAG, the predictions for every node at every
configuration, the SLA and deadline, the platform the run goes to and the tasks pinned by
``dask.annotate(memory=…)`` — and returns a ``Plan``: per task its configuration, the
root bundles the client will invoke (roots grouped by configuration, so a bundle never
runs a task at a size it was not planned at), and what the platform model
(``simulate.simulate_platform``) predicts of it: every task's start and finish, the
invocations, cold starts, the critical path, the makespan and Lambda's bill. A task is
never planned below the memory it needs (``Predictor.memory_need_mb``: its measured peak
with headroom, above any size it ran out of memory at).

* ``UniformPlanner`` — one configuration for every task (by default the middle one). It is
  also what any planner falls back to before history exists: the run then records the
  metrics the next plan learns from.
* ``CriticalPathPlanner`` ("critical-path", the default) — first the fastest makespan the
  configurations allow (the best, on the platform model, of every uniform plan and of
  every task at the smallest size that runs it fastest); the SLA's deadline is then set
  from it (``"fastest+10%"``) or given in seconds. A deadline below the fastest makespan
  cannot be kept: the plan is the fastest and a ``PlanWarning`` names its makespan. Then,
  in one pass from the sink back to the roots over the unconstrained ``Timeline``, every
  task takes the cheapest configuration whose predicted finish still leaves its dependents
  their latest start — tasks off the critical path have slack and go down first, tasks
  that wait on I/O go to the smallest size (memory buys them nothing), tasks on the
  critical path only when the deadline leaves room. The result is run on the platform
  model; should it miss the target (slots, bundles and cold starts the pass does not see),
  the tasks the pass slowed down most are restored, in growing batches, until it holds.
* ``WukongPlanner`` ("wukong") — no static optimisation: every task gets the smallest
  configuration it fits in and the runtime schedules dynamically (a worker continues with
  a ready child and invokes workers for the others), as in Wukong.

Under a percentile SLA (``"p95"``) the fastest makespan, the target and the plan's
prediction are that percentile of the makespan's distribution (``Plan.quantile_s``).

All are passes over the node indices (a topological order) with incremental updates of
the timeline, plus a bounded number of platform simulations: planning costs a few passes
over the DAG.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from statistics import NormalDist, pvariance
from typing import Any, Protocol

from dask_serverless.graph import DAG
from dask_serverless.planning.bundling import Bundling, bundle_roots
from dask_serverless.planning.locality import ClientPlacement
from dask_serverless.planning.predict import Predictor
from dask_serverless.planning.simulate import (
    ANY_MEMORY,
    FirstChild,
    NodeCosts,
    Platform,
    Schedule,
    Timeline,
    makespan_quantile,
    simulate_platform,
)
from dask_serverless.planning.sla import SLA, Deadline
from dask_serverless.report import Pricing

_EPSILON = 1e-9
_TABLE_ROWS = 200
# Monte Carlo draws of the makespan, and the most node simulations they may cost; above
# that a normal approximation along the critical path stands in.
MONTE_CARLO_DRAWS = 64
MONTE_CARLO_BUDGET = 8_000
# Node simulations the draws may cost per second of the predicted makespan: at some 25 µs
# each, the draws take at most ~5% of the run they judge (a 0.1 s run gets the normal
# approximation; planning must not cost more than the run it plans).
MONTE_CARLO_NODES_PER_S = 2_000
# Above this many tasks a platform simulation is worth a few passes over the DAG: the
# search simulates only the likeliest candidates and restores in one step.
LARGE_DAG = 2_000
# Candidates for the fastest plan within this fraction of the quickest count as as fast.
AS_FAST = 0.01
# A platform makespan this many times the unconstrained one means the slots bind.
SLOT_BOUND = 2.0


class PlanWarning(UserWarning):
    """The plan cannot keep what was asked (a deadline below the fastest makespan)."""


@dataclass(frozen=True)
class PlanInputs:
    """Everything a planner decides from.

    The per-node predictions (``costs``, a pass over the DAG at every configuration) are
    computed on first use: a planner that decides per function — no history yet, or work
    too small to plan (``small_work``) — never pays for them.
    """

    dag: DAG
    functions: Sequence[str]
    predictor: Predictor
    configs: tuple[int, ...]
    sla: SLA
    deadline: Deadline
    pinned: Mapping[int, int] = field(default_factory=dict)
    min_work_s: float = 0.0
    platform: Platform = field(default_factory=Platform)
    pricing: Pricing = field(default_factory=Pricing)
    literals: Sequence[int] | None = None
    # Tasks the client runs beside their literal data (``planning.locality``): not the
    # workers' to plan, and never known to history.
    placement: ClientPlacement = field(default_factory=ClientPlacement)

    @cached_property
    def costs(self) -> NodeCosts:
        return NodeCosts.predict(
            self.dag, self.functions, self.predictor, self.configs, self.literals
        )

    @cached_property
    def task_counts(self) -> Counter[str]:
        """How many of the workers' tasks call each function (the sink aside)."""
        placed = self.placement.nodes
        return Counter(f for i, f in enumerate(self.functions[: self.dag.sink]) if i not in placed)

    @cached_property
    def has_history(self) -> bool:
        """Does history know the workers' functions (or have the workers no tasks)?"""
        counts = self.task_counts
        return not counts or any(self.predictor.knows(f) for f in counts)

    @cached_property
    def small_work(self) -> bool:
        """Is the DAG's whole predicted work below ``min_work_s``?

        Every function must be known; each task counts at its function's largest input
        seen and the smallest configuration, so the bound errs on the large side. Below it
        no plan can save more than noise, and planning would cost more than it saves.
        """
        if not self.has_history or self.pinned:
            return False
        total = self.work_bound_s(self.configs[0])
        return total is not None and total < self.min_work_s

    def work_bound_s(self, memory_mb: int) -> float | None:
        """The DAG's whole work at ``memory_mb``, every task at its function's largest
        input seen; None when a function is unknown."""
        total = 0.0
        for function, count in self.task_counts.items():
            bound = self.predictor.work_bound_s(function, memory_mb)
            if bound is None:
                return None
            total += count * bound
        return total

    def worth_one_invocation(self, memory: Sequence[int]) -> bool:
        """Is the whole DAG's work less than a second invocation costs (its invoke latency,
        a warm start, an output stored and read)? Then all its roots start in one.

        Splitting work ``W`` over two invocations saves at most ``W / 2``: below twice that
        cost, one invocation starting every root finishes first. Only a small-work plan
        with one configuration for every task qualifies.
        """
        return self.one_invocation_s(memory) is not None

    def one_invocation_s(self, memory: Sequence[int]) -> float | None:
        """Twice what a second invocation costs, when the whole DAG's work is below it
        (``worth_one_invocation``): the task seconds one invocation may spend before
        handing work on pays (``RunRecord.keep_local_s``). None otherwise."""
        if not self.small_work:
            return None
        sizes = {memory[i] for i in range(self.dag.sink)}
        if len(sizes) != 1:
            return None
        (size,) = sizes
        work = self.work_bound_s(size)
        predictor = self.predictor
        second = (
            self.platform.invoke_latency_s
            + predictor.startup(size).warm_s
            + 2 * predictor.transfer_time(0, size)
        )
        return 2 * second if work is not None and work <= 2 * second else None

    @cached_property
    def per_node(self) -> bool:
        """Do planners need per-node predictions, or is a per-function view enough?"""
        return self.has_history and not self.small_work

    @cached_property
    def _allowed_by_function(self) -> dict[str, tuple[int, ...]]:
        return {}

    @cached_property
    def _fitting_by_need(self) -> dict[float, tuple[int, ...]]:
        return {}

    def _fitting(self, need_mb: float) -> tuple[int, ...]:
        """The configurations of at least ``need_mb`` (the largest if none), one tuple per
        distinct need: tasks of one function mostly need the same."""
        table = self._fitting_by_need
        fitting = table.get(need_mb)
        if fitting is None:
            fitting = tuple(m for m in self.configs if m >= need_mb) or self.configs[-1:]
            table[need_mb] = fitting
        return fitting

    def full_speed_config(self) -> int:
        """The smallest configuration a single-threaded task runs at full speed in.

        Below it, every second of a worker — its own overhead included — stretches with the
        CPU share while the GB-s stay the same, so smaller buys nothing but latency.
        """
        cpu = self.predictor.cpu
        fastest = max(cpu.speed(m) for m in self.configs)
        return next(m for m in self.configs if cpu.speed(m) >= fastest)

    def middle_config(self) -> int:
        return self.configs[len(self.configs) // 2]

    def allowed(self, i: int) -> tuple[int, ...]:
        """The configurations task ``i`` fits in (its pinned one, if it is pinned)."""
        if i in self.pinned:
            return (self.pinned[i],)
        if self.per_node:
            return self._fitting(self.costs.need_mb[i])
        function = self.functions[i]
        table = self._allowed_by_function
        if function not in table:
            table[function] = self._fitting(self.predictor.need_bound_mb(function))
        return table[function]

    def at_least(self, i: int, memory_mb: int) -> int:
        """``memory_mb``, or the smallest allowed configuration above it."""
        allowed = self.allowed(i)
        if memory_mb in allowed:
            return memory_mb
        return next((m for m in allowed if m >= memory_mb), allowed[-1])

    def bundle(self, memory: Sequence[int]) -> Bundling:
        """The root bundles the client will invoke for ``memory`` (one size per bundle),
        the longest remaining path first: a platform with fewer slots than bundles starts
        them in that order, and the critical path should not wait behind side branches.
        A DAG worth less than a second invocation starts in one (``worth_one_invocation``)."""
        bundles = 1 if self.worth_one_invocation(memory) else self.platform.bundles
        bundling = bundle_roots(self.dag, bundles, memory)
        if not self.per_node or len(bundling.starts) < 2:
            return bundling
        remaining = self.remaining_work(memory)
        starts = sorted(bundling.starts, key=lambda group: -max(remaining[r] for r in group))
        return Bundling(starts, bundling.internal)

    def remaining_work(self, memory: Sequence[int]) -> list[float]:
        """Per node, the predicted time of the longest path from its start to the sink."""
        dag, costs = self.dag, self.costs
        column = {m: c for c, m in enumerate(self.configs)}
        middle = len(self.configs) // 2
        remaining = [0.0] * len(dag)
        for i in range(len(dag) - 1, -1, -1):
            own = costs.exec_s[i][column.get(memory[i], middle)]
            remaining[i] = own + max((remaining[c] for c in dag.dependents[i]), default=0.0)
        return remaining

    def schedule(
        self,
        memory: Sequence[int],
        bundling: Bundling | None = None,
        scale: Sequence[float] | None = None,
        prewarm: tuple[tuple[int, int], ...] = (),
        loaded: bool = False,
    ) -> Schedule:
        """``memory`` run on the platform model (with ``prewarm`` instances started);
        ``loaded``: on the cores the machine's other load leaves (``Platform.loaded``)."""
        bundling = bundling or self.bundle(memory)
        platform = self.platform.loaded() if loaded else self.platform
        platform = replace(platform, prewarm=prewarm) if prewarm else platform
        return simulate_platform(
            self.dag,
            self.costs,
            memory,
            bundling.starts,
            bundling.internal,
            platform,
            self.pricing,
            scale,
        )

    def prewarm(self, memory: Sequence[int], schedule: Schedule) -> tuple[tuple[int, int], ...]:
        """Instances worth starting as the run starts: per configuration, its cold starts
        that come late enough for a boot begun at the start to be ready (pre-warming).
        Kept only when the platform model says the run gets faster."""
        column = {m: c for c, m in enumerate(self.configs)}
        counts: dict[int, int] = {}
        for inv in schedule.invocations:
            boot = self.costs.cold_s[column.get(inv.memory_mb, len(self.configs) // 2)]
            if inv.cold and inv.arrived >= boot:
                counts[inv.memory_mb] = counts.get(inv.memory_mb, 0) + 1
        if not counts:
            return ()
        proposal = tuple(sorted(counts.items()))
        warmed = self.schedule(memory, prewarm=proposal)
        return proposal if warmed.makespan < schedule.makespan - _EPSILON else ()

    def quantile(
        self,
        memory: Sequence[int],
        schedule: Schedule,
        prewarm: tuple[tuple[int, int], ...] = (),
        loaded: bool = False,
    ) -> float:
        """The SLA's percentile of the makespan of ``memory`` (the mean under "average")."""
        percentile = self.sla.percentile
        if percentile is None or not self.per_node:
            return schedule.makespan
        n = max(len(self.dag), 1)
        budget = min(MONTE_CARLO_BUDGET, int(schedule.makespan * MONTE_CARLO_NODES_PER_S))
        draws = min(MONTE_CARLO_DRAWS, budget // n)
        if draws >= 16:
            bundling = self.bundle(memory)
            value = makespan_quantile(
                lambda scale: self.schedule(memory, bundling, scale, prewarm, loaded),
                self.costs,
                percentile / 100,
                draws,
            )
        else:
            value = normal_quantile(self.costs, schedule, percentile / 100)
        # A slow-side percentile is never below the mean prediction.
        return max(value, schedule.makespan) if percentile >= 50 else value


def normal_quantile(costs: NodeCosts, schedule: Schedule, q: float) -> float:
    """The makespan's ``q`` quantile, as the critical path's sum of independent residuals.

    A ratio scales a task's execution only (as in the Monte Carlo draws), never its
    transfers and start-up: a millisecond task's noisy ratios stay a millisecond's noise.
    """
    column = {m: c for c, m in enumerate(costs.configs)}
    variance = 0.0
    # A function's ratios are one tuple shared by its tasks: their variance once per tuple.
    variances: dict[int, float] = {}
    for i in schedule.critical_path():
        ratios = costs.ratios[i]
        if len(ratios) > 1:
            if id(ratios) not in variances:
                variances[id(ratios)] = pvariance(ratios)
            executes = costs.exec_s[i][column.get(schedule.memory[i], len(costs.configs) // 2)]
            variance += variances[id(ratios)] * min(executes, schedule.duration(i)) ** 2
    return schedule.makespan + NormalDist().inv_cdf(q) * math.sqrt(variance)


@dataclass(frozen=True)
class Plan:
    """A configuration for every task, and what the platform model predicts of it (I-7).

    ``memory_mb`` is what the run needs and ``bundling`` the root invocations the client
    makes; everything predicted (start and finish times, invocations, critical path,
    cost) comes from ``timeline``, simulated on first use.
    """

    planner: str
    sla: str
    keys: tuple[Any, ...]
    memory_mb: tuple[int, ...]
    inputs: PlanInputs = field(repr=False, compare=False)
    bundling: Bundling = field(repr=False, compare=False)
    target_s: float | None = None
    fastest_s: float | None = None
    notes: tuple[str, ...] = ()
    functions: Sequence[str] = field(default=(), repr=False, compare=False)
    schedule: Schedule | None = field(default=None, repr=False, compare=False)
    # Instances per configuration (MB) the backend starts ahead (pre-warming).
    prewarm: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, name: str, inputs: PlanInputs, memory: Sequence[int], **extra: Any) -> Plan:
        """A plan of ``memory``, simulated on the platform model when looked at."""
        assigned = list(memory)
        assigned[inputs.dag.sink] = ANY_MEMORY
        return cls(
            planner=name,
            sla=str(inputs.sla),
            keys=inputs.dag.keys,
            memory_mb=tuple(assigned),
            inputs=inputs,
            bundling=inputs.bundle(assigned),
            **extra,
        )

    @cached_property
    def timeline(self) -> Schedule:
        """The run as predicted: on the cores the machine's other load leaves, when it
        leaves fewer than the platform has (the search's schedule otherwise)."""
        loaded = self.inputs.platform.loaded() is not self.inputs.platform
        if self.schedule is not None and not loaded:
            return self.schedule
        return self.inputs.schedule(
            self.memory_mb, self.bundling, prewarm=self.prewarm, loaded=loaded
        )

    @cached_property
    def quantile_s(self) -> float:
        """The SLA's percentile of the predicted makespan (the mean under "average")."""
        return self.inputs.quantile(self.memory_mb, self.timeline, self.prewarm, loaded=True)

    @property
    def start_s(self) -> list[float]:
        return self.timeline.start

    @property
    def finish_s(self) -> list[float]:
        return self.timeline.finish

    @property
    def continues(self) -> list[int]:
        return self.timeline.continues

    @cached_property
    def critical_path(self) -> tuple[int, ...]:
        return tuple(self.timeline.critical_path())

    @property
    def node_cost_gb_s(self) -> list[float]:
        return self.timeline.node_cost

    @property
    def predicted_makespan_s(self) -> float:
        """The mean predicted makespan."""
        return self.timeline.makespan

    @property
    def predicted_cost_gb_s(self) -> float:
        return self.timeline.cost_gb_s

    @property
    def predicted_cost_usd(self) -> float:
        return self.timeline.cost_usd

    @property
    def sink(self) -> int:
        return len(self.keys) - 1

    def first_needed(self) -> dict[int, float]:
        """Seconds into the run each configuration is first invoked (pre-warming)."""
        return dict(self.timeline.first_needed)

    def worker_memory(self) -> tuple[int | None, ...]:
        """The configuration a worker needs for each node; None for the sink (any)."""
        return tuple(None if i == self.sink else m for i, m in enumerate(self.memory_mb))

    def on_critical_path(self, i: int) -> bool:
        return i in self._critical

    @cached_property
    def _critical(self) -> frozenset[int]:
        return frozenset(self.critical_path)

    def predicted_s(self, i: int) -> float:
        """Predicted busy seconds of node ``i`` (download, execution, upload)."""
        return self.finish_s[i] - self.start_s[i]

    def invocations(self) -> list[list[int]]:
        """Tasks grouped by the invocation the platform model runs them in (the sink aside)."""
        return [
            [i for i in inv.tasks if i != self.sink]
            for inv in self.timeline.invocations
            if any(i != self.sink for i in inv.tasks)
        ]

    def summary(self) -> str:
        target = "" if self.target_s is None else f", target {self.target_s:.3f} s"
        quantile = "" if self.sla == "average" else f" ({self.sla} {self.quantile_s:.3f} s)"
        timeline = self.timeline
        lines = [
            f"Plan by {self.planner} (SLA {self.sla}{target}): predicted makespan "
            f"{self.predicted_makespan_s:.3f} s{quantile}, cost "
            f"{self.predicted_cost_gb_s:.3f} GB-s (${self.predicted_cost_usd:.8f}), "
            f"{len(timeline.invocations)} invocations ({timeline.cold_starts} cold)"
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def table(self, limit: int | None = _TABLE_ROWS) -> str:
        from dask_serverless.report import format_table

        critical = self._critical
        rows = [
            [
                str(self.keys[i]),
                str(self.memory_mb[i]),
                f"{self.start_s[i]:.3f}",
                f"{self.finish_s[i]:.3f}",
                "*" if i in critical else "",
                f"{self.node_cost_gb_s[i]:.4f}",
            ]
            for i in range(self.sink)
        ]
        header = ["task", "MB", "start s", "finish s", "critical", "GB-s"]
        return format_table(header, rows, limit)

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.table()}"


class Planner(Protocol):
    @property
    def name(self) -> str: ...

    def plan(self, inputs: PlanInputs) -> Plan: ...


def simulate(inputs: PlanInputs, memory: Sequence[int]) -> Timeline:
    """The unconstrained timeline of ``memory`` (the search's view)."""
    return Timeline(inputs.dag, inputs.costs, memory)


@dataclass(frozen=True)
class UniformPlanner:
    """One configuration for every task (``memory``; default: the middle one)."""

    memory: int | None = None
    name: str = "uniform"

    def plan(self, inputs: PlanInputs) -> Plan:
        memory = self.memory or inputs.middle_config()
        if memory not in inputs.configs:
            raise ValueError(f"{memory} MB is not one of the configurations {inputs.configs}")
        plan_memory = [inputs.at_least(i, memory) for i in range(len(inputs.dag))]
        return Plan.of(f"{self.name} {memory} MB", inputs, plan_memory)


@dataclass(frozen=True)
class WukongPlanner:
    """The smallest configuration each task fits in; dynamic scheduling at run time."""

    name: str = "wukong"

    def plan(self, inputs: PlanInputs) -> Plan:
        return Plan.of(self.name, inputs, smallest_fitting(inputs))


def smallest_fitting(inputs: PlanInputs) -> list[int]:
    return [inputs.allowed(i)[0] for i in range(len(inputs.dag))]


@dataclass(frozen=True)
class CriticalPathPlanner:
    """The fastest makespan, then the cheapest plan within the SLA's target (see above)."""

    name: str = "critical-path"

    def plan(self, inputs: PlanInputs) -> Plan:
        if not inputs.has_history:
            fallback = UniformPlanner().plan(inputs)
            note = "no history yet: uniform middle configuration, recording metrics"
            return _renamed(fallback, f"{self.name} (no history)", note)
        if inputs.small_work:
            full_speed = inputs.full_speed_config()
            note = (
                f"predicted work under {inputs.min_work_s:g} s: no search, every task at "
                f"{full_speed} MB, the smallest configuration at full single-thread speed"
            )
            plan_memory = [inputs.at_least(i, full_speed) for i in range(len(inputs.dag))]
            return Plan.of(f"{self.name} (small work)", inputs, plan_memory, notes=(note,))
        notes: list[str] = []
        candidates = self.candidates(inputs)
        fastest_memory, fastest = self.fastest(candidates)
        fastest_q = inputs.quantile(fastest_memory, fastest)
        target = inputs.deadline.target(fastest_q)
        if target < fastest_q - _EPSILON:
            message = (
                f"deadline {inputs.deadline} ({target:.3f} s) is below the fastest predicted "
                f"makespan {fastest_q:.3f} s ({inputs.sla}): planning the fastest"
            )
            warnings.warn(PlanWarning(message), stacklevel=4)
            notes.append(message)
            target = fastest_q
        # The search works on means: the target scaled by the fastest plan's mean/pNN.
        mean_target = target * fastest.makespan / fastest_q if fastest_q > 0 else target
        fixed = {i for i in range(inputs.dag.sink) if i in inputs.pinned}
        fixed |= {i for i in range(inputs.dag.sink) if not inputs.costs.known[i]}
        base = simulate(inputs, fastest_memory)
        large = len(inputs.dag) > LARGE_DAG
        schedule: Schedule | None
        if large and fastest.makespan > SLOT_BOUND * base.makespan:
            # Queued behind the slots, every task's time counts: there is no slack to sell.
            notes.append("the run is bound by the platform's slots: every task at its fastest")
            memory, schedule = list(fastest_memory), fastest
        else:
            # The unconstrained timeline leaves out queueing: give the pass the same margin.
            cheap_target = mean_target * base.makespan / fastest.makespan if fastest.makespan else 0
            memory = downgrade(inputs, base, cheap_target, fixed)
            timeline = simulate(inputs, memory)
            if timeline.makespan > cheap_target + _EPSILON:
                timeline = repair(timeline, base, cheap_target, fixed)
            if not large:
                regroup(inputs, timeline, cheap_target, fixed)
            memory = [timeline.effective_memory(i) for i in range(len(inputs.dag))]
            memory = smallest_when_memory_buys_nothing(inputs, memory, fixed)
            memory, schedule = restore(
                inputs, memory, fastest_memory, fastest, mean_target, fixed, 1 if large else None
            )
        unknown = sum(1 for i in range(inputs.dag.sink) if not inputs.costs.known[i])
        if unknown:
            notes.append(f"{unknown} task(s) without history kept at their fastest-plan size")
        if schedule is None:
            schedule = inputs.schedule(memory)
        # A candidate already simulated that keeps the target for less wins.
        for other_memory, other in candidates:
            if other.makespan <= mean_target + _EPSILON and other.cost_gb_s < schedule.cost_gb_s:
                memory, schedule = list(other_memory), other
        prewarm = inputs.prewarm(memory, schedule)
        if prewarm:
            notes.append(
                "pre-warming "
                + ", ".join(f"{count} x {mb} MB" for mb, count in prewarm)
                + " as the run starts"
            )
            schedule = inputs.schedule(memory, prewarm=prewarm)
        plan = Plan.of(
            self.name,
            inputs,
            memory,
            target_s=target,
            fastest_s=fastest_q,
            notes=tuple(notes),
            prewarm=prewarm,
        )
        return _with_schedule(plan, schedule)

    @staticmethod
    def fastest(candidates: Sequence[tuple[list[int], Schedule]]) -> tuple[list[int], Schedule]:
        """The cheapest of the candidates within a percent of the quickest."""
        quickest = min(schedule.makespan for _memory, schedule in candidates)
        return min(
            (ms for ms in candidates if ms[1].makespan <= quickest * (1 + AS_FAST)),
            key=lambda ms: ms[1].cost_gb_s,
        )

    @staticmethod
    def candidates(inputs: PlanInputs) -> list[tuple[list[int], Schedule]]:
        """On the platform model: every uniform plan, every task at the smallest of its
        fastest sizes (equal speeds are one speed: no 3008 MB for a single-threaded task)
        — in each, tasks memory does not speed up at their smallest size."""
        n = len(inputs.dag)
        costs = inputs.costs
        column = {m: c for c, m in enumerate(costs.configs)}
        candidates = [[inputs.at_least(i, m) for i in range(n)] for m in inputs.configs]
        own = []
        for i in range(n):
            allowed = inputs.allowed(i)
            own.append(
                min(allowed, key=lambda m: (round(costs.exec_s[i][column[m]], 6), m))
                if costs.known[i]
                else inputs.at_least(i, inputs.middle_config())
            )
        candidates.append(own)
        # Whatever the candidate, memory buys an I/O-bound task nothing.
        fixed = {i for i in range(inputs.dag.sink) if i in inputs.pinned or not costs.known[i]}
        candidates = [smallest_when_memory_buys_nothing(inputs, c, fixed) for c in candidates]
        if len(inputs.dag) > LARGE_DAG:
            # Preselect on the unconstrained timeline: own sizes and the full-speed uniforms.
            full_speed = inputs.full_speed_config()
            likely = [candidates[-1]] + [
                candidates[c] for c, m in enumerate(inputs.configs) if m >= full_speed
            ]
            timelines = [(memory, simulate(inputs, memory)) for memory in likely]
            best = min(timelines, key=lambda mt: (round(mt[1].makespan, 6), mt[1].cost_gb_s))
            candidates = [best[0]]
        return [(memory, inputs.schedule(memory)) for memory in candidates]


def smallest_when_memory_buys_nothing(
    inputs: PlanInputs, memory: list[int], fixed: set[int]
) -> list[int]:
    """Every task whose predicted time is the same at its smallest allowed size (it waits
    on I/O, it sleeps) goes there: more memory would only cost more. Whole I/O chains move
    together, so they still continue one another."""
    costs = inputs.costs
    column = {m: c for c, m in enumerate(costs.configs)}
    moved = list(memory)
    for i in range(inputs.dag.sink):
        if i in fixed or memory[i] == ANY_MEMORY:
            continue
        smallest = inputs.allowed(i)[0]
        at_smallest = costs.exec_s[i][column[smallest]]
        if at_smallest <= costs.exec_s[i][column[memory[i]]] * (1 + AS_FAST):
            moved[i] = smallest
    return moved


def restore(
    inputs: PlanInputs,
    memory: list[int],
    fastest_memory: Sequence[int],
    fastest: Schedule,
    target: float,
    fixed: set[int],
    steps: int | None = None,
) -> tuple[list[int], Schedule | None]:
    """Check ``memory`` on the platform model; restore slowed tasks until it keeps ``target``.

    The tasks are restored to their fastest-plan size in order of how much the downgrade
    slowed them, in batches that double (a platform simulation each), so at most about
    log2(n) simulations run — or ``steps``, after which the fastest plan stands. Returns
    the memory and its schedule.
    """
    schedule = inputs.schedule(memory)
    if schedule.makespan <= target + _EPSILON:
        return memory, schedule
    costs = inputs.costs
    column = {m: c for c, m in enumerate(costs.configs)}

    def slowdown(i: int) -> float:
        return costs.exec_s[i][column[memory[i]]] - costs.exec_s[i][column[fastest_memory[i]]]

    # Only tasks that memory makes faster: a sleep restored to 1769 MB gains nothing.
    slowed = sorted(
        (
            i
            for i in range(inputs.dag.sink)
            if i not in fixed
            and memory[i] != fastest_memory[i]
            and memory[i] != ANY_MEMORY
            and slowdown(i) > _EPSILON
        ),
        key=lambda i: -slowdown(i),
    )
    batch, done = 1, 0
    if steps is not None:
        batch = max(1, len(slowed) // 2)
    current = list(memory)
    while done < len(slowed) and (steps is None or steps > 0):
        if steps is not None:
            steps -= 1
        for i in slowed[done : done + batch]:
            current[i] = fastest_memory[i]
        done += batch
        batch *= 2
        schedule = inputs.schedule(current)
        if schedule.makespan <= target + _EPSILON:
            return current, schedule
    return list(fastest_memory), fastest


def _with_schedule(plan: Plan, schedule: Schedule) -> Plan:
    return replace(plan, schedule=schedule)


def downgrade(inputs: PlanInputs, base: Timeline, target: float, fixed: set[int]) -> list[int]:
    """One pass from the sink to the roots: each task's cheapest size that keeps the target.

    ``latest_start[c]`` is the latest a decided task ``c`` may start executing; a task
    ``i`` must finish by every child's latest start minus the delay between them (nothing
    when the child continues ``i``'s invocation, else its start-up and download), and can
    finish no earlier than its parents' finish in the ``base`` plan plus the same delays.
    """
    dag, costs = inputs.dag, inputs.costs
    column = base.column
    memory = list(base.memory)
    first = FirstChild(dag, memory)
    out = costs.output_bytes
    sink = dag.sink
    latest_start = [math.inf] * len(dag)
    latest_start[sink] = target

    def delay(parent: int, child: int, parent_mb: int, child_mb: int) -> float:
        if child == sink:
            if parent == base.critical_parent[sink]:
                return 0.0
            return costs.download_s(out[parent], column[parent_mb])
        if parent_mb == child_mb:
            first_here = first.of(parent, parent_mb)
            if len(dag.dependencies[child]) == 1:
                if first_here < 0 or first_here >= child:
                    return 0.0
            elif base.critical_parent[child] == parent and first_here < 0:
                return 0.0
        c = column[child_mb]
        return costs.startup_s[c] + costs.download_s(out[parent], c)

    for i in range(sink - 1, -1, -1):
        parents, children = dag.dependencies[i], dag.dependents[i]
        options = (memory[i],) if i in fixed else inputs.allowed(i)
        best: tuple[float, int, float] | None = None
        for m in options:
            c = column[m]
            busy = costs.exec_s[i][c] + costs.upload_s[i][c]
            latest_finish = min(
                (latest_start[ch] - delay(i, ch, m, memory[ch]) for ch in children),
                default=target,
            )
            delays = [delay(p, i, base.memory[p], m) for p in parents]
            earliest = max(
                (base.finish[p] + d for p, d in zip(parents, delays, strict=True)),
                default=costs.startup_s[c],
            )
            if earliest + busy > latest_finish + _EPSILON and i not in fixed:
                continue
            cost = m / 1024 * (busy + (sum(delays) if parents else costs.startup_s[c]))
            for ch in children:
                if ch != sink and delay(i, ch, m, memory[ch]) > 0:
                    cost += memory[ch] / 1024 * delay(i, ch, m, memory[ch])
            key = (cost, 0 if m == memory[i] else 1)
            if best is None or key < (best[0], 0 if best[1] == memory[i] else 1):
                best = (cost, m, latest_finish - busy)
        if best is None:
            c = column[memory[i]]
            busy = costs.exec_s[i][c] + costs.upload_s[i][c]
            finish_by = min(
                (latest_start[ch] - delay(i, ch, memory[i], memory[ch]) for ch in children),
                default=target,
            )
            latest_start[i] = finish_by - busy
            continue
        if best[1] != memory[i]:
            memory[i] = best[1]
            first.moved(i)
        latest_start[i] = best[2]
    memory[sink] = ANY_MEMORY
    return memory


def repair(timeline: Timeline, fastest: Timeline, target: float, fixed: set[int]) -> Timeline:
    """Restore downgraded tasks on the critical path until the target is met."""
    while timeline.makespan > target + _EPSILON:
        changed = [
            i
            for i in timeline.critical_path()
            if i not in fixed and i != timeline.dag.sink and timeline.memory[i] != fastest.memory[i]
        ]
        if not changed:
            return fastest
        worst = max(
            changed,
            key=lambda i: timeline.duration(i) - fastest.duration(i),
        )
        timeline.set_memory(worst, fastest.memory[worst])
    return timeline


def regroup(
    inputs: PlanInputs, timeline: Timeline, target: float, fixed: set[int], groups: int = 16
) -> None:
    """Move whole invocations to a cheaper size where the target still holds.

    The per-task pass cannot move a chain that runs in one invocation: moving any one of
    its tasks alone breaks the chain (a new invocation, a transfer). Here each of the
    ``groups`` costliest invocations (those on the critical path first) tries every
    smaller size as a whole, kept when the makespan stays within ``target`` and the cost
    drops. Bounded — at most two passes' worth of node updates — so planning stays a few
    passes over the DAG.
    """
    dag = inputs.dag
    owner: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i in range(dag.sink):
        root = owner.get(timeline.continues[i], i) if timeline.continues[i] >= 0 else i
        owner[i] = root
        members.setdefault(root, []).append(i)
    on_path = {owner[i] for i in timeline.critical_path() if i != dag.sink}
    chosen = sorted(
        (g for g in members if not fixed.intersection(members[g])),
        key=lambda g: (g not in on_path, -sum(timeline.node_cost[i] for i in members[g])),
    )[:groups]
    budget = 2 * len(dag)
    for group in (members[g] for g in chosen):
        if budget <= 0:
            return
        current = [timeline.memory[i] for i in group]
        allowed = set.intersection(*(set(inputs.allowed(i)) for i in group))
        for memory_mb in sorted(m for m in allowed if m < max(current)):
            cost = timeline.cost_gb_s
            budget -= timeline.set_memories(dict.fromkeys(group, memory_mb))
            if timeline.makespan <= target + _EPSILON and timeline.cost_gb_s < cost - _EPSILON:
                break
            budget -= timeline.set_memories(dict(zip(group, current, strict=True)))


def _renamed(plan: Plan, name: str, note: str) -> Plan:
    return replace(plan, planner=name, notes=(*plan.notes, note))


PLANNERS: dict[str, type] = {
    "uniform": UniformPlanner,
    "critical-path": CriticalPathPlanner,
    "wukong": WukongPlanner,
}


def make_planner(spec: str | Planner | None) -> Planner:
    """The planner named ``spec`` (or ``spec`` itself); ValueError for an unknown name.

    ``"uniform-3008"`` is the uniform planner at 3008 MB.
    """
    if spec is None:
        return CriticalPathPlanner()
    if not isinstance(spec, str):
        if not callable(getattr(spec, "plan", None)):
            raise ValueError(f"a planner needs a plan(inputs) method, got {spec!r}")
        return spec
    name = spec.strip().lower()
    if name.startswith("uniform-") and name[len("uniform-") :].isdigit():
        return UniformPlanner(memory=int(name[len("uniform-") :]))
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {spec!r}; available: {', '.join(PLANNERS)}")
    planner: Planner = PLANNERS[name]()
    return planner
