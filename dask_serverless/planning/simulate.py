"""Simulate a plan: when every task runs, in which invocation, and what the run costs.

Two simulations share the per-node predictions (``NodeCosts``):

``Timeline`` — the planner's search tool. No platform limits: every invocation starts as
soon as it is invoked, so one pass over the indices (a topological order) computes every
node's earliest start and finish, and ``set_memory`` recomputes only what one change can
affect (the node, its siblings, and, while times keep changing, its descendants — in index
order with a heap, no recursion). Its rules follow the worker protocol:

* a worker continues with the first ready child whose configuration equals its own (the
  sink runs wherever its last input finished); a fan-in child becomes ready in the worker
  of its parent that finished last. A child that *continues* its parent's invocation pays
  no start-up and reads that input from memory; any other child is a new invocation: it
  waits for a warm start-up and downloads the outputs of every parent it does not
  continue;
* a node's duration is download + execution + upload, the upload only when its output
  may be read by another worker (``output_leaves_worker``).

``simulate_platform`` — the run as the platform will run it (``Platform``): an event
simulation of the worker protocol itself. The client invokes the root *bundles* (roots
grouped by configuration, ``bundling.bundle_roots``); each invocation queues at the
platform, which starts it on an idle instance of its configuration (a warm start), or boots
a new one (a cold start) while fewer than ``slots`` instances live — evicting an idle
instance of another configuration at the limit — and otherwise keeps it queued. Instances
idle longer than ``keep_alive_s`` are gone. An invocation runs its tasks one after another:
download, the part of the execution that waits (I/O, sleep), the CPU part at the
configuration's speed, and the upload when the output leaves the worker. Where instances
share a machine (``cores``, the local backend), CPU parts running at once share its cores:
each gets at most its speed, and the cores are divided fairly among them (water-filling);
an instance's setup (before its first task) runs at its speed, or at the cores when those
are fewer (a busy machine, ``Platform.loaded``). Then the worker publishes, counts fan-in
children (the last parent wins the child), and splits the ready children exactly as
``WorkerLogic.split`` and ``share`` do: one continues here, others get new invocations
while the platform has room (reaching the platform after ``invoke_latency_s``), the rest
stay on this worker's stack. The result (``Schedule``) has every node's start and finish,
every invocation with its configuration, cold or warm start-up, begin and end, the makespan
and the bill (``report.Pricing``: duration rounded up to 1 ms, times GB, plus the request
fee).

``makespan_quantile`` judges a pNN SLA on the distribution of the makespan: it repeats
``simulate_platform`` with every task's time multiplied by a ratio drawn from its
function's measured/predicted ratios (Monte Carlo) and returns the percentile of the
makespans — never a sum of per-task percentiles.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from dask_serverless.graph import DAG
from dask_serverless.planning.predict import Line, Predictor
from dask_serverless.planning.sla import quantile
from dask_serverless.protocol.placement import output_leaves_worker
from dask_serverless.report import Pricing
from dask_serverless.worker.loop import fixed_bottom

ANY_MEMORY = 0


@dataclass(frozen=True)
class NodeCosts:
    """Per-node predictions for every configuration, computed once per plan.

    ``exec_s[i][c]`` and ``upload_s[i][c]`` are mean seconds at ``configs[c]``;
    ``io_s[i]`` (waiting) plus ``cpu_s[i]`` (CPU seconds at full speed) divided by
    ``speed[i][c]`` make up ``exec_s``. ``output_bytes[i]`` and ``need_mb[i]`` do not
    depend on the configuration. ``cold_s`` and ``warm_s`` are start-ups per configuration,
    ``startup_s`` the warm one the search assumes (the platform model decides which
    invocations actually start cold); ``setups`` their setups' cold and warm CPU work and
    the speed it runs at, per configuration (``startups_on``).
    """

    configs: tuple[int, ...]
    exec_s: tuple[tuple[float, ...], ...]
    upload_s: tuple[tuple[float, ...], ...]
    input_bytes: tuple[float, ...]
    output_bytes: tuple[float, ...]
    need_mb: tuple[float, ...]
    known: tuple[bool, ...]
    startup_s: tuple[float, ...]
    transfer: tuple[Line, ...]
    io_s: tuple[tuple[float, ...], ...] = ()
    cpu_s: tuple[tuple[float, ...], ...] = ()
    speed: tuple[tuple[float, ...], ...] = ()
    cold_s: tuple[float, ...] = ()
    warm_s: tuple[float, ...] = ()
    boot_s: tuple[float, ...] = ()
    ratios: tuple[tuple[float, ...], ...] = ()
    setups: tuple[tuple[float, float, float], ...] = ()

    @classmethod
    def predict(
        cls,
        dag: DAG,
        functions: Sequence[str],
        predictor: Predictor,
        configs: Sequence[int],
        literals: Sequence[int] | None = None,
    ) -> NodeCosts:
        configs = tuple(configs)
        n = len(dag)
        input_bytes = [0.0] * n
        output_bytes = [0.0] * n
        exec_s: list[tuple[float, ...]] = []
        upload_s: list[tuple[float, ...]] = []
        io_s: list[tuple[float, ...]] = []
        cpu_s: list[tuple[float, ...]] = []
        speed: list[tuple[float, ...]] = []
        need_mb = [0.0] * n
        ratios: dict[str, tuple[float, ...]] = {}
        none = tuple(0.0 for _ in configs)
        ones = tuple(1.0 for _ in configs)
        transfer = tuple(
            Line(predictor.transfer_time(0, m), predictor.transfer_time(2**20, m) / 2**20)
            for m in configs
        )
        for i in range(n):
            input_bytes[i] = sum(output_bytes[p] for p in dag.dependencies[i])
            if literals is not None:
                input_bytes[i] += literals[i]
            if i == dag.sink:
                exec_s.append(none)
                upload_s.append(none)
                io_s.append(none)
                cpu_s.append(none)
                speed.append(ones)
                continue
            function = functions[i]
            if function not in ratios:
                ratios[function] = predictor.ratios(function)
            output_bytes[i] = predictor.output_bytes(function, input_bytes[i])
            waits, work = predictor.exec_parts(function, input_bytes[i])
            speeds = tuple(predictor.speed(function, m) for m in configs)
            io_s.append(tuple(waits for _ in configs))
            cpu_s.append(tuple(work for _ in configs))
            speed.append(speeds)
            exec_s.append(tuple(waits + work / v for v in speeds))
            if output_leaves_worker(dag, i):
                upload_s.append(tuple(t.at(output_bytes[i]) for t in transfer))
            else:
                upload_s.append(none)
            need_mb[i] = predictor.memory_need_mb(function, input_bytes[i], output_bytes[i])
        startups = [predictor.startup(m) for m in configs]
        return cls(
            configs=configs,
            exec_s=tuple(exec_s),
            upload_s=tuple(upload_s),
            input_bytes=tuple(input_bytes),
            output_bytes=tuple(output_bytes),
            need_mb=tuple(need_mb),
            known=tuple(predictor.knows(f) for f in functions),
            startup_s=tuple(s.warm_s for s in startups),
            transfer=transfer,
            io_s=tuple(io_s),
            cpu_s=tuple(cpu_s),
            speed=tuple(speed),
            cold_s=tuple(s.cold_s for s in startups),
            warm_s=tuple(s.warm_s for s in startups),
            boot_s=tuple(s.boot_s for s in startups),
            ratios=tuple(ratios.get(f, ()) for f in functions),
            setups=tuple((s.setup_cpu_s, s.warm_setup_cpu_s, s.setup_speed) for s in startups),
        )

    def startups_on(self, cores: float | None) -> tuple[list[float], list[float]]:
        """Cold and warm start-ups per configuration where instances get at most
        ``cores`` CPUs: the setup's CPU work at its speed, or slower on fewer CPUs."""
        cold, warm = list(self.cold_s), list(self.warm_s)
        if cores is None:
            return cold, warm
        for column, (cold_work, warm_work, speed) in enumerate(self.setups):
            stretch = 1 / min(speed, cores) - 1 / speed
            cold[column] += cold_work * stretch
            warm[column] += warm_work * stretch
        return cold, warm

    def upload_s_at(self, i: int, column: int) -> float:
        """Seconds to store node ``i``'s output (whether or not the plan expects it to)."""
        return self.transfer[column].at(self.output_bytes[i])

    def download_s(self, nbytes: float, column: int) -> float:
        if nbytes <= 0:
            return 0.0
        return self.transfer[column].at(nbytes)


class FirstChild:
    """Per parent: its first single-dependency child of each configuration (lazily)."""

    def __init__(self, dag: DAG, memory: list[int]) -> None:
        self.dag = dag
        self.memory = memory
        self._first: dict[int, dict[int, int]] = {}

    def of(self, parent: int, memory_mb: int) -> int:
        """The child that continues ``parent``'s worker at ``memory_mb``, or -1."""
        table = self._first.get(parent)
        if table is None:
            table = self._build(parent)
        child = table.get(memory_mb, -1)
        if child < 0 and self.dag.dependencies[self.dag.sink] == (parent,):
            return self.dag.sink
        return child

    def _build(self, parent: int) -> dict[int, int]:
        table: dict[int, int] = {}
        dag = self.dag
        for child in dag.dependents[parent]:
            if len(dag.dependencies[child]) == 1 and child != dag.sink:
                table.setdefault(self.memory[child], child)
        self._first[parent] = table
        return table

    def moved(self, child: int) -> None:
        """``child``'s configuration changed: forget its parents' tables."""
        for parent in self.dag.dependencies[child]:
            self._first.pop(parent, None)


class Timeline:
    """The simulated run of one assignment of configurations (``memory[i]`` in MB)."""

    def __init__(self, dag: DAG, costs: NodeCosts, memory: Sequence[int]) -> None:
        n = len(dag)
        self.dag = dag
        self.costs = costs
        self.column = {m: c for c, m in enumerate(costs.configs)}
        self.memory = list(memory)
        self.memory[dag.sink] = ANY_MEMORY
        self.start = [0.0] * n
        self.finish = [0.0] * n
        self.continues = [-1] * n
        self.critical_parent = [-1] * n
        self.node_cost = [0.0] * n
        self.cost_gb_s = 0.0
        self.first_child = FirstChild(dag, self.memory)
        for i in range(n):
            self._store(i, self._evaluate(i))

    @property
    def makespan(self) -> float:
        return self.finish[self.dag.sink]

    def effective_memory(self, i: int) -> int:
        """The configuration node ``i`` runs at (the sink runs with its last input)."""
        if i == self.dag.sink:
            parent = self.critical_parent[i]
            return self.memory[parent] if parent >= 0 else ANY_MEMORY
        return self.memory[i]

    def _evaluate(self, i: int) -> tuple[float, float, int, int, float]:
        """``(start, finish, continued parent, critical parent, cost)`` of node ``i``."""
        dag, costs, finish, memory = self.dag, self.costs, self.finish, self.memory
        parents = dag.dependencies[i]
        critical = -1
        ready = 0.0
        for p in parents:
            if critical < 0 or finish[p] > ready:
                critical, ready = p, finish[p]
        if i == dag.sink:
            mem = memory[critical] if critical >= 0 else costs.configs[0]
            continued = critical
        else:
            mem = memory[i]
            continued = -1
            if critical >= 0 and memory[critical] == mem:
                first = self.first_child.of(critical, mem)
                if (len(parents) == 1 and first == i) or (len(parents) > 1 and first < 0):
                    continued = critical
        column = self.column[mem]
        startup = 0.0 if continued >= 0 else costs.startup_s[column]
        remote = sum(costs.output_bytes[p] for p in parents if p != continued)
        start = ready + startup
        busy = costs.download_s(remote, column) + costs.exec_s[i][column]
        busy += costs.upload_s[i][column]
        cost = mem / 1024 * (busy + startup) if i != dag.sink else 0.0
        return start, start + busy, continued, critical, cost

    def _store(self, i: int, value: tuple[float, float, int, int, float]) -> None:
        self.start[i], self.finish[i], self.continues[i], self.critical_parent[i], cost = value
        self.cost_gb_s += cost - self.node_cost[i]
        self.node_cost[i] = cost

    def set_memory(self, i: int, memory_mb: int) -> int:
        """Give node ``i`` another configuration; returns how many nodes were recomputed."""
        return self.set_memories({i: memory_mb})

    def set_memories(self, changes: Mapping[int, int]) -> int:
        """Give several nodes other configurations at once, with one propagation."""
        dirty: set[int] = set()
        for i, memory_mb in changes.items():
            if self.memory[i] == memory_mb:
                continue
            self.memory[i] = memory_mb
            self.first_child.moved(i)
            dirty.add(i)
            dirty.update(self.dag.dependents[i])
            for parent in self.dag.dependencies[i]:
                dirty.update(self.dag.dependents[parent])
        return self.recompute(dirty) if dirty else 0

    def recompute(self, dirty: Iterable[int]) -> int:
        """Re-evaluate ``dirty`` nodes and, while results change, their descendants."""
        heap = sorted(set(dirty))
        queued = set(heap)
        count = 0
        while heap:
            i = heapq.heappop(heap)
            queued.discard(i)
            count += 1
            old = (self.start[i], self.finish[i], self.continues[i], self.critical_parent[i])
            value = self._evaluate(i)
            self._store(i, value)
            if value[:4] != old:
                for child in self.dag.dependents[i]:
                    if child not in queued:
                        queued.add(child)
                        heapq.heappush(heap, child)
        return count

    def critical_path(self) -> list[int]:
        """Node indices from a root to the sink along the critical parents."""
        path = [self.dag.sink]
        while self.critical_parent[path[-1]] >= 0:
            path.append(self.critical_parent[path[-1]])
        path.reverse()
        return path

    def duration(self, i: int) -> float:
        return self.finish[i] - self.start[i]


# -- the platform model -------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """What the platform a run goes to is like (see the module docstring).

    ``slots``: instances that may live at once (the local pool's concurrency, the Lambda
    account's concurrency); ``load_aware``: workers keep ready children themselves while
    the run's load is at ``slots`` (the runtime does when the backend's concurrency is
    known); ``cores``: CPUs every instance shares (the local machine), None when each
    instance has its own; ``capacity``: of those cores, the CPUs this backend's instances
    got in the last runs (the machine's other load took the rest; None: all of them);
    ``boot_cores``: where booting instances share other cores than tasks (``loaded``);
    ``warm``: idle instances per configuration (MB) when the run starts.

    Sizes are chosen on the platform's own cores (``capacity`` is the machine's passing
    load, which any size shares alike); the run is predicted on ``loaded()``.
    """

    slots: int | None = None
    load_aware: bool = False
    cores: float | None = None
    capacity: float | None = None
    boot_cores: float | None = None
    bundles: int = 256
    keep_alive_s: float = 60.0
    invoke_latency_s: float = 0.002
    task_overhead_s: float = 0.0
    cluster_output_bytes: float = 2**20
    warm: tuple[tuple[int, int], ...] = ()
    prewarm: tuple[tuple[int, int], ...] = ()

    def loaded(self) -> Platform:
        """The platform as the run will find it: its tasks' cores down to ``capacity``.

        Booting instances are not in the backend's cgroup yet, and a cold start measured on
        the busy machine already took its load: they keep sharing the machine's cores.
        """
        if self.cores is None or self.capacity is None or self.capacity >= self.cores:
            return self
        return replace(self, cores=self.capacity, capacity=None, boot_cores=self.cores)


@dataclass
class Invocation:
    """One simulated invocation: its configuration, tasks, start-up, begin and end."""

    number: int
    memory_mb: int
    starts: list[int]
    arrived: float = 0.0
    cold: bool = False
    startup_s: float = 0.0
    begin: float = 0.0
    end: float = 0.0
    tasks: list[int] = field(default_factory=list)
    stack: list[int] = field(default_factory=list)
    here: set[int] = field(default_factory=set)
    remaining: dict[int, int] = field(default_factory=dict)
    clustered: set[int] = field(default_factory=set)
    unstored: set[int] = field(default_factory=set)
    previous: int = -1
    # The bottom of the stack that can never be handed on, as last seen
    # (``worker.loop.fixed_bottom``).
    fixed: list[int] = field(default_factory=list)

    @property
    def billed_s(self) -> float:
        """Duration as billed: the handler's, plus a cold start's initialisation."""
        return self.end - self.begin + (self.startup_s if self.cold else 0.0)


@dataclass
class Schedule:
    """A simulated run on a platform (``simulate_platform``); the shape of ``Timeline``."""

    dag: DAG
    memory: list[int]
    start: list[float]
    finish: list[float]
    critical_parent: list[int]
    invocation_of: list[int]
    invocations: list[Invocation]
    makespan: float
    cost_gb_s: float
    cost_usd: float
    first_needed: dict[int, float]

    @property
    def continues(self) -> list[int]:
        """Per node, the node its invocation ran just before it (-1: it began one)."""
        previous = [-1] * len(self.dag)
        for invocation in self.invocations:
            for before, after in zip(invocation.tasks, invocation.tasks[1:], strict=False):
                previous[after] = before
        return previous

    @property
    def node_cost(self) -> list[float]:
        """GB-s of each node's busy time (the invocations' start-ups and rounding aside)."""
        return [
            self.memory[i] / 1024 * max(0.0, self.finish[i] - self.start[i])
            for i in range(len(self.dag))
        ]

    @property
    def cold_starts(self) -> int:
        return sum(1 for inv in self.invocations if inv.cold)

    def critical_path(self) -> list[int]:
        path = [self.dag.sink]
        while self.critical_parent[path[-1]] >= 0:
            path.append(self.critical_parent[path[-1]])
        path.reverse()
        return path

    def effective_memory(self, i: int) -> int:
        return self.memory[i]

    def duration(self, i: int) -> float:
        return self.finish[i] - self.start[i]


def water_fill(caps: Sequence[float], cores: float | None) -> list[float]:
    """CPU rates of tasks running at once: each at most its cap, the cores shared fairly."""
    if cores is None or sum(caps) <= cores:
        return list(caps)
    fair = cores / len(caps)
    if min(caps) >= fair:
        # No task is held below an equal share: the cores are split evenly.
        return [fair] * len(caps)
    rates = [0.0] * len(caps)
    left, count = cores, len(caps)
    for position, index in enumerate(sorted(range(len(caps)), key=lambda k: caps[k])):
        fair = left / (count - position)
        rates[index] = min(caps[index], fair)
        left -= rates[index]
    return rates


_ARRIVE, _STARTED, _PHASE = 0, 1, 2


class _PlatformRun:
    """The state of one ``simulate_platform`` call (see the module docstring)."""

    def __init__(
        self,
        dag: DAG,
        costs: NodeCosts,
        memory: Sequence[int],
        starts: Sequence[Sequence[int]],
        internal: frozenset[int],
        platform: Platform,
        scale: Sequence[float] | None,
    ) -> None:
        self.dag, self.costs, self.platform = dag, costs, platform
        self.internal = internal
        self.scale = scale
        self.column = {m: c for c, m in enumerate(costs.configs)}
        self.cold_s, self.warm_s = costs.startups_on(platform.cores)
        self.memory = list(memory)
        self.memory[dag.sink] = ANY_MEMORY
        n = len(dag)
        self.start = [0.0] * n
        self.finish = [0.0] * n
        self.critical = [-1] * n
        self.invocation_of = [-1] * n
        self.waiting = [len(d) for d in dag.dependencies]
        # Per node, what publishing it involves (fixed by the DAG and the bundles):
        # children counted in this invocation, single-dependency and fan-in children.
        self.internal_children: list[tuple[int, ...]] = []
        self.single_children: list[tuple[int, ...]] = []
        self.fan_in_children: list[tuple[int, ...]] = []
        for i in range(n):
            children = dag.dependents[i]
            self.internal_children.append(tuple(c for c in children if c in internal))
            self.single_children.append(
                tuple(c for c in children if c not in internal and len(dag.dependencies[c]) == 1)
            )
            self.fan_in_children.append(
                tuple(c for c in children if c not in internal and len(dag.dependencies[c]) > 1)
            )
        self.events: list[tuple[float, int, int, int, int]] = []
        self.sequence = 0
        self.queue: list[Invocation] = []
        self.idle: dict[int, list[float]] = {}
        for memory_mb, count in platform.warm:
            self.idle.setdefault(memory_mb, []).extend([-0.0] * count)
        self.live = sum(len(v) for v in self.idle.values())
        # Pre-warmed instances per configuration: when each is ready.
        self.prewarmed: dict[int, list[float]] = {}
        for memory_mb, count in platform.prewarm:
            column = self.column.get(memory_mb, len(costs.configs) // 2)
            for _ in range(count):
                if platform.slots is not None and self.live >= platform.slots:
                    break
                self.live += 1
                self.prewarmed.setdefault(memory_mb, []).append(self.cold_s[column])
        self.load = 0
        self.invocations: list[Invocation] = []
        # CPU parts running now: invocation number → [remaining CPU s, cap]; those of
        # instances still booting are in ``booting``.
        self.cpu: dict[int, list[float]] = {}
        self.cpu_changes = 0
        self.booting: set[int] = set()
        self.now = 0.0
        self.makespan = 0.0
        self.first_needed: dict[int, float] = {}
        default = costs.configs[len(costs.configs) // 2]
        for group in starts:
            sizes = [self.memory[t] for t in group if self.memory[t] != ANY_MEMORY]
            self.invoke(group, max(sizes, default=default), latency=0.0)

    # -- the platform --------------------------------------------------------------------

    def push(self, at: float, kind: int, number: int, data: int = 0) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (at, self.sequence, kind, number, data))

    def invoke(self, tasks: Sequence[int], memory_mb: int, latency: float | None = None) -> None:
        invocation = Invocation(len(self.invocations), memory_mb, list(tasks))
        invocation.stack = list(tasks)
        self.invocations.append(invocation)
        self.load += 1
        self.first_needed.setdefault(memory_mb, self.now)
        delay = self.platform.invoke_latency_s if latency is None else latency
        self.push(self.now + delay, _ARRIVE, invocation.number)

    def dispatch(self) -> None:
        """Start queued invocations on warm instances, or boot instances while there is room."""
        platform = self.platform
        waiting = []
        for position, invocation in enumerate(self.queue):
            idle = self.idle.get(invocation.memory_mb)
            while idle and self.now - idle[0] > platform.keep_alive_s:
                idle.pop(0)
                self.live -= 1
            column = self.column.get(invocation.memory_mb, len(self.costs.configs) // 2)
            prewarmed = self.prewarmed.get(invocation.memory_mb)
            if idle:
                idle.pop()
                invocation.cold = False
                invocation.startup_s = self.warm_s[column]
            elif prewarmed:
                # Billed its initialisation, started once the instance is ready.
                ready = prewarmed.pop(0)
                invocation.cold = True
                invocation.startup_s = self.cold_s[column]
                start = max(self.now, ready) + self.warm_s[column]
                self.push(start, _STARTED, invocation.number)
                continue
            elif platform.slots is None or self.live < platform.slots:
                self.live += 1
                self.boot(invocation, column)
                continue
            elif self.evict_idle():
                self.boot(invocation, column)
                continue
            elif any(self.prewarmed.values()):
                waiting.append(invocation)
                continue
            else:
                # Every slot is taken and no instance is idle or booting ahead: nothing
                # queued behind this one can start either.
                waiting.extend(self.queue[position:])
                break
            self.push(self.now + invocation.startup_s, _STARTED, invocation.number)
        self.queue = waiting

    def boot(self, invocation: Invocation, column: int) -> None:
        """A cold start. On a shared machine the boot is CPU work contending with
        everything else running; the hand-over follows."""
        invocation.cold = True
        invocation.startup_s = self.cold_s[column]
        if self.platform.cores is None:
            self.push(self.now + invocation.startup_s, _STARTED, invocation.number)
            return
        invocation.arrived = self.now
        self.booting.add(invocation.number)
        # Measured boots do not depend on the size: one CPU's worth at most.
        self.cpu[invocation.number] = [self.costs.boot_s[column], 1.0]
        self.cpu_changes += 1

    def booted(self, invocation: Invocation) -> None:
        self.booting.discard(invocation.number)
        column = self.column.get(invocation.memory_mb, len(self.costs.configs) // 2)
        handover = max(0.0, self.cold_s[column] - self.costs.boot_s[column])
        invocation.startup_s = self.now - invocation.arrived + handover
        self.push(self.now + handover, _STARTED, invocation.number)

    def evict_idle(self) -> bool:
        for idle in self.idle.values():
            if idle:
                idle.pop(0)
                return True
        return False

    def spare(self) -> int | None:
        if not self.platform.load_aware or self.platform.slots is None:
            return None
        return self.platform.slots - self.load

    # -- the worker ----------------------------------------------------------------------

    def fits(self, invocation: Invocation, index: int) -> bool:
        return self.memory[index] in (ANY_MEMORY, invocation.memory_mb)

    def next_task(self, invocation: Invocation) -> None:
        """Begin the next task on the invocation's stack, or end the invocation."""
        if not invocation.stack:
            invocation.end = self.now
            self.load -= 1
            self.idle.setdefault(invocation.memory_mb, []).append(self.now)
            self.dispatch()
            return
        index = invocation.stack.pop()
        dag, costs = self.dag, self.costs
        column = self.column.get(invocation.memory_mb, 0)
        parents = dag.dependencies[index]
        remote = sum(costs.output_bytes[p] for p in parents if p not in invocation.here)
        self.start[index] = self.now
        self.invocation_of[index] = invocation.number
        invocation.tasks.append(index)
        latest, critical = -1.0, invocation.previous
        if critical >= 0:
            latest = self.finish[critical]
        for p in parents:
            if self.finish[p] > latest:
                latest, critical = self.finish[p], p
        self.critical[index] = critical
        invocation.previous = index
        download = costs.download_s(remote, column)
        if index == dag.sink:
            self.finish[index] = self.now + download
            self.makespan = self.finish[index]
            self.push(self.finish[index], _PHASE, invocation.number, 3)
            return
        factor = 1.0 if self.scale is None else self.scale[index]
        waiting = download + costs.io_s[index][column] * factor + self.platform.task_overhead_s
        self.push(self.now + waiting, _PHASE, invocation.number, 1)

    def begin_cpu(self, invocation: Invocation) -> None:
        index = invocation.previous
        factor = 1.0 if self.scale is None else self.scale[index]
        column = self.column.get(invocation.memory_mb, 0)
        work = self.costs.cpu_s[index][column] * factor
        cap = self.costs.speed[index][column]
        if work <= 0:
            self.end_cpu(invocation)
        elif self.platform.cores is None:
            self.push(self.now + work / cap, _PHASE, invocation.number, 2)
        else:
            self.cpu[invocation.number] = [work, cap]
            self.cpu_changes += 1

    def end_cpu(self, invocation: Invocation) -> None:
        """The execution ended: publish (with its upload when the output leaves)."""
        index = invocation.previous
        external_single = len(self.single_children[index])
        if external_single > 1:
            spare = self.spare()
            large = self.costs.output_bytes[index] >= self.platform.cluster_output_bytes
            if (spare is not None and spare <= 0) or large:
                invocation.clustered.add(index)
        # output_leaves_worker, from the tables above
        leaves = bool(self.fan_in_children[index]) or (
            external_single > 1 and index not in invocation.clustered
        )
        upload = 0.0
        if leaves:
            upload = self.costs.upload_s[index][self.column.get(invocation.memory_mb, 0)]
        else:
            invocation.unstored.add(index)
        self.push(self.now + upload, _PHASE, invocation.number, 3)

    def complete(self, invocation: Invocation) -> None:
        """Publish done: count children, split them as the worker does, continue."""
        index = invocation.previous
        dag = self.dag
        self.finish[index] = self.now
        if index == dag.sink:
            invocation.stack.clear()
            self.next_task(invocation)
            return
        here: list[int] = []
        for child in self.internal_children[index]:
            remaining = invocation.remaining.get(child, len(dag.dependencies[child])) - 1
            invocation.remaining[child] = remaining
            if remaining == 0:
                here.append(child)
        others = list(self.single_children[index])
        waiting = self.waiting
        for child in self.fan_in_children[index]:
            waiting[child] -= 1
            if waiting[child] == 0:
                others.append(child)
        memory, own = self.memory, invocation.memory_mb
        fitting = [c for c in others if memory[c] == own or memory[c] == ANY_MEMORY]
        elsewhere = [c for c in others if memory[c] != own and memory[c] != ANY_MEMORY]
        if index in invocation.clustered:
            here += fitting
        else:
            spare = self.spare()
            room = len(fitting) if spare is None else max(0, spare - len(elsewhere))
            here += fitting[:1] + fitting[1 + room :]
            elsewhere += fitting[1 : 1 + room]
        extra = 0.0
        if elsewhere and index in invocation.unstored:
            invocation.unstored.discard(index)
            extra = self.costs.upload_s_at(index, self.column.get(invocation.memory_mb, 0))
        invocation.here.add(index)
        for child in elsewhere:
            self.invoke([child], self.memory[child] or invocation.memory_mb)
        invocation.stack.extend(here)
        self.share(invocation)
        if extra > 0:
            self.finish[index] = self.now + extra
            self.push(self.now + extra, _PHASE, invocation.number, 4)
        else:
            self.next_task(invocation)

    def bundled(self, index: int) -> bool:
        internal = self.internal
        return index in internal or any(c in internal for c in self.dag.dependents[index])

    def share(self, invocation: Invocation) -> None:
        """Hand tasks from the bottom of the stack to new workers while there is room."""
        spare = self.spare()
        if spare is None or spare <= 0 or len(invocation.stack) < 2:
            return
        stack = invocation.stack
        moved: list[int] = []

        def stays(index: int) -> bool:
            return self.bundled(index) or not self.fits(invocation, index)

        fixed = fixed_bottom(stack, invocation.fixed, stays)
        for index in itertools.islice(stack, fixed, len(stack) - 1):
            if len(moved) >= spare:
                break
            if not stays(index):
                moved.append(index)
        if moved:
            taken = set(moved)
            invocation.stack[:] = [i for i in invocation.stack if i not in taken]
            for index in moved:
                self.invoke([index], self.memory[index] or invocation.memory_mb)

    # -- the clock -----------------------------------------------------------------------

    def share_cores(self) -> dict[int, float]:
        """CPU rates of everything computing now: tasks and boots share the cores, or —
        on a busy machine (``boot_cores``) — tasks share the backend's capacity and boots,
        which run before the instance joins the backend's cgroup, the machine's cores."""
        platform = self.platform
        if platform.boot_cores is None:
            members = list(self.cpu)
            shares = water_fill([self.cpu[k][1] for k in members], platform.cores)
            return dict(zip(members, shares, strict=True))
        rates: dict[int, float] = {}
        for booting, cores in ((False, platform.cores), (True, platform.boot_cores)):
            members = [k for k in self.cpu if (k in self.booting) == booting]
            shares = water_fill([self.cpu[k][1] for k in members], cores)
            rates.update(zip(members, shares, strict=True))
        return rates

    def run(self) -> None:
        events = self.events
        rates: dict[int, float] = {}
        shared = -1
        while events or self.cpu:
            next_cpu, cpu_number = float("inf"), -1
            if self.cpu:
                if shared != self.cpu_changes:
                    # Who computes changed: share the cores anew.
                    shared = self.cpu_changes
                    rates = self.share_cores()
                for number, rate in rates.items():
                    at = self.now + self.cpu[number][0] / rate
                    if at < next_cpu:
                        next_cpu, cpu_number = at, number
            else:
                rates = {}
            if events and events[0][0] <= next_cpu:
                at, _seq, kind, number, data = heapq.heappop(events)
            else:
                at, kind, number, data = next_cpu, _PHASE, cpu_number, 2
            elapsed = at - self.now
            if elapsed > 0:
                for key, rate in rates.items():
                    self.cpu[key][0] -= rate * elapsed
            self.now = max(self.now, at)
            invocation = self.invocations[number]
            if kind == _ARRIVE:
                invocation.arrived = self.now
                self.queue.append(invocation)
                self.dispatch()
            elif kind == _STARTED:
                invocation.begin = self.now
                self.next_task(invocation)
            elif data == 1:
                self.begin_cpu(invocation)
            elif data == 2:
                if self.cpu.pop(number, None) is not None:
                    self.cpu_changes += 1
                if number in self.booting:
                    self.booted(invocation)
                else:
                    self.end_cpu(invocation)
            elif data == 3:
                self.complete(invocation)
            else:
                self.next_task(invocation)


def simulate_platform(
    dag: DAG,
    costs: NodeCosts,
    memory: Sequence[int],
    starts: Sequence[Sequence[int]],
    internal: frozenset[int],
    platform: Platform,
    pricing: Pricing | None = None,
    scale: Sequence[float] | None = None,
) -> Schedule:
    """The run of ``memory`` on ``platform``, invoked as ``starts`` (see module docstring).

    ``scale`` multiplies every node's execution time (the Monte Carlo draws).
    """
    run = _PlatformRun(dag, costs, memory, starts, internal, platform, scale)
    run.run()
    pricing = pricing or Pricing()
    billed = [(inv.memory_mb, inv.billed_s) for inv in run.invocations]
    # Pre-warmed instances no invocation used still booted.
    for memory_mb, unused in run.prewarmed.items():
        billed += [(memory_mb, ready) for ready in unused]
    bill = pricing.bill(billed)
    memory_of = [
        run.invocations[run.invocation_of[i]].memory_mb if run.invocation_of[i] >= 0 else 0
        for i in range(len(dag))
    ]
    return Schedule(
        dag=dag,
        memory=memory_of,
        start=run.start,
        finish=run.finish,
        critical_parent=run.critical,
        invocation_of=run.invocation_of,
        invocations=run.invocations,
        makespan=run.makespan,
        cost_gb_s=bill.gb_s,
        cost_usd=bill.usd,
        first_needed=run.first_needed,
    )


def makespan_quantile(
    simulate: Callable[[Sequence[float] | None], Schedule],
    costs: NodeCosts,
    quantile_q: float,
    draws: int,
    seed: int = 0,
) -> float:
    """The ``quantile_q`` makespan over ``draws`` runs with resampled task times."""
    rng = random.Random(seed)
    makespans = []
    for _ in range(draws):
        scale = [rng.choice(r) if r else 1.0 for r in costs.ratios]
        makespans.append(simulate(scale).makespan)
    return quantile(makespans, quantile_q)
