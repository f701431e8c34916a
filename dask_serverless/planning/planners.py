"""Planners: give every task a configuration (memory MB) so the run meets its SLA cheaply.

A planner gets ``PlanInputs`` — the DAG, the predictions for every node at every
configuration, the SLA and deadline, and the tasks pinned by ``dask.annotate(memory=…)``
— and returns a ``Plan``: per task its configuration, predicted start and finish, which
invocation it continues (the worker assignment the runtime will follow), the critical path
and the predicted cost. A task is never planned below the memory it needs
(``Predictor.memory_need_mb``).

* ``UniformPlanner`` — one configuration for every task (by default the middle one). It is
  also what any planner falls back to before history exists: the run then records the
  metrics the next plan learns from.
* ``CriticalPathPlanner`` ("critical-path", the default) — first the fastest makespan the
  configurations allow (the best of every uniform plan and of every task at its own
  fastest configuration); the SLA's deadline is then set from it (``"fastest+10%"``) or
  given in seconds. Then, in one pass from the sink back to the roots, every task takes the
  cheapest configuration whose predicted finish still leaves its dependents their latest
  start — tasks off the critical path have slack and go down first, tasks on it only when
  the deadline leaves room. The pass uses the earliest finishes of the fastest plan for a
  task's parents, which may still move, so the result is simulated again and, should it
  miss the target, tasks on its critical path are restored one by one.
* ``WukongPlanner`` ("wukong") — no static optimisation: every task gets the smallest
  configuration it fits in and the runtime schedules dynamically (a worker continues with
  a ready child and invokes workers for the others), as in Wukong.

All are iterative passes over the node indices (a topological order) with incremental
updates of the simulated timeline: planning costs a few passes over the DAG.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from dask_serverless.graph import DAG
from dask_serverless.planning.critical_path import ANY_MEMORY, FirstChild, NodeCosts, Timeline
from dask_serverless.planning.predict import Predictor
from dask_serverless.planning.sla import SLA, Deadline

_EPSILON = 1e-9
_TABLE_ROWS = 200


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

    @cached_property
    def costs(self) -> NodeCosts:
        return NodeCosts.predict(self.dag, self.functions, self.predictor, self.configs)

    @cached_property
    def task_counts(self) -> Counter[str]:
        """How many tasks call each function (the sink aside)."""
        return Counter(self.functions[: self.dag.sink])

    @cached_property
    def has_history(self) -> bool:
        return any(self.predictor.knows(f) for f in self.task_counts)

    @cached_property
    def small_work(self) -> bool:
        """Is the DAG's whole predicted work below ``min_work_s``?

        Every function must be known; each task counts at its function's largest input
        seen and the smallest configuration, so the bound errs on the large side. Below it
        no plan can save more than noise, and planning would cost more than it saves.
        """
        if not self.has_history or self.pinned:
            return False
        smallest = self.configs[0]
        total = 0.0
        for function, count in self.task_counts.items():
            bound = self.predictor.work_bound_s(function, smallest)
            if bound is None:
                return False
            total += count * bound
        return total < self.min_work_s

    @cached_property
    def per_node(self) -> bool:
        """Do planners need per-node predictions, or is a per-function view enough?"""
        return self.has_history and not self.small_work

    @cached_property
    def _allowed_by_function(self) -> dict[str, tuple[int, ...]]:
        return {}

    def _fitting(self, need_mb: float) -> tuple[int, ...]:
        return tuple(m for m in self.configs if m >= need_mb) or self.configs[-1:]

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


@dataclass(frozen=True)
class Plan:
    """A configuration for every task, and what the simulation predicts of it (I-7).

    ``memory_mb`` is what the run needs; everything predicted (start and finish times,
    continuations, critical path, cost) comes from ``timeline``, simulated on first use
    when the planner did not need a simulation to decide.
    """

    planner: str
    sla: str
    keys: tuple[Any, ...]
    memory_mb: tuple[int, ...]
    simulate: Callable[[], Timeline] = field(repr=False, compare=False)
    target_s: float | None = None
    fastest_s: float | None = None
    notes: tuple[str, ...] = ()
    functions: Sequence[str] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_timeline(cls, name: str, inputs: PlanInputs, timeline: Timeline, **extra: Any) -> Plan:
        return cls(
            planner=name,
            sla=str(inputs.sla),
            keys=inputs.dag.keys,
            memory_mb=tuple(timeline.effective_memory(i) for i in range(len(inputs.dag))),
            simulate=lambda: timeline,
            **extra,
        )

    @classmethod
    def deferred(cls, name: str, inputs: PlanInputs, memory: Sequence[int], **extra: Any) -> Plan:
        """A plan of ``memory`` whose timeline is simulated only when looked at."""
        assigned = list(memory)
        assigned[inputs.dag.sink] = ANY_MEMORY
        return cls(
            planner=name,
            sla=str(inputs.sla),
            keys=inputs.dag.keys,
            memory_mb=tuple(assigned),
            simulate=lambda: simulate(inputs, assigned),
            **extra,
        )

    @cached_property
    def timeline(self) -> Timeline:
        return self.simulate()

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
        return self.timeline.makespan

    @property
    def predicted_cost_gb_s(self) -> float:
        return self.timeline.cost_gb_s

    @property
    def sink(self) -> int:
        return len(self.keys) - 1

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
        """Tasks grouped by the invocation the plan expects to run them (the sink aside)."""
        owner: dict[int, int] = {}
        groups: dict[int, list[int]] = {}
        for i in range(self.sink):
            parent = self.continues[i]
            root = owner[parent] if parent >= 0 else i
            owner[i] = root
            groups.setdefault(root, []).append(i)
        return list(groups.values())

    def summary(self) -> str:
        target = "" if self.target_s is None else f", target {self.target_s:.3f} s"
        lines = [
            f"Plan by {self.planner} (SLA {self.sla}{target}): predicted makespan "
            f"{self.predicted_makespan_s:.3f} s, cost {self.predicted_cost_gb_s:.3f} GB-s, "
            f"{len(self.invocations())} invocations"
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
        return Plan.deferred(f"{self.name} {memory} MB", inputs, plan_memory)


@dataclass(frozen=True)
class WukongPlanner:
    """The smallest configuration each task fits in; dynamic scheduling at run time."""

    name: str = "wukong"

    def plan(self, inputs: PlanInputs) -> Plan:
        return Plan.deferred(self.name, inputs, smallest_fitting(inputs))


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
            return Plan.deferred(f"{self.name} (small work)", inputs, plan_memory, notes=(note,))
        notes: list[str] = []
        fastest = self.fastest(inputs)
        target = inputs.deadline.target(fastest.makespan)
        if target < fastest.makespan - _EPSILON:
            notes.append(
                f"deadline {inputs.deadline} ({target:.3f} s) is below the fastest predicted "
                f"makespan {fastest.makespan:.3f} s: planning the fastest"
            )
            target = fastest.makespan
        fixed = {i for i in range(inputs.dag.sink) if i in inputs.pinned}
        fixed |= {i for i in range(inputs.dag.sink) if not inputs.costs.known[i]}
        memory = downgrade(inputs, fastest, target, fixed)
        timeline = simulate(inputs, memory)
        if timeline.makespan > target + _EPSILON:
            timeline = repair(timeline, fastest, target, fixed)
        regroup(inputs, timeline, target, fixed)
        unknown = sum(1 for i in range(inputs.dag.sink) if not inputs.costs.known[i])
        if unknown:
            notes.append(f"{unknown} task(s) without history kept at their fastest-plan size")
        return Plan.from_timeline(
            self.name,
            inputs,
            timeline,
            target_s=target,
            fastest_s=fastest.makespan,
            notes=tuple(notes),
        )

    @staticmethod
    def fastest(inputs: PlanInputs) -> Timeline:
        """The fastest of: every uniform plan, every task at its own fastest size."""
        n = len(inputs.dag)
        costs = inputs.costs
        candidates = [[inputs.at_least(i, m) for i in range(n)] for m in inputs.configs]
        own = []
        for i in range(n):
            allowed = inputs.allowed(i)
            column = {m: c for c, m in enumerate(costs.configs)}
            own.append(
                min(allowed, key=lambda m: (costs.exec_s[i][column[m]], -m))
                if costs.known[i]
                else inputs.at_least(i, inputs.middle_config())
            )
        candidates.append(own)
        timelines = [simulate(inputs, memory) for memory in candidates]
        return min(timelines, key=lambda t: (round(t.makespan, 9), t.cost_gb_s))


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
    from dataclasses import replace

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
