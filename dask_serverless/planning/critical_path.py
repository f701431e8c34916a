"""Simulate a plan: earliest start and finish of every node, the critical path, the cost.

The simulation follows the worker protocol, so that what it predicts is what runs:

* every root is invoked at time 0 and pays its configuration's start-up;
* a worker continues with the first ready child whose configuration equals its own (the
  sink, which only gathers the result, runs wherever its last input finished); a fan-in
  child becomes ready in the worker of its parent that finished last. A child that
  *continues* its parent's invocation pays no start-up and reads that input from memory;
  any other child is a new invocation: it waits for the start-up of its configuration and
  downloads the outputs of every parent it does not continue;
* a node's duration is download + execution + upload, the upload only when its output
  may be read by another worker (``output_leaves_worker``).

So ``finish[i] = start[i] + download + exec + upload`` with ``start[i]`` the latest
finish among its parents, plus the start-up when ``i`` starts an invocation. The
*critical parent* of a node is the parent that finished last; following critical parents
back from the sink gives the critical path, and the sink's finish is the makespan. The
cost is the billed memory-time: GB (MB / 1024) times each node's duration, plus every
invocation's start-up.

Nodes are numbered in topological order, so one forward pass over the indices computes
everything, and ``Timeline.set_memory`` recomputes only what one change can affect: the
node, its siblings (their continuation may move) and, as long as times keep changing, its
descendants — in index order with a heap, no recursion.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dask_serverless.graph import DAG
from dask_serverless.planning.predict import Line, Predictor
from dask_serverless.protocol.placement import output_leaves_worker

ANY_MEMORY = 0


@dataclass(frozen=True)
class NodeCosts:
    """Per-node predictions for every configuration, computed once per plan.

    ``exec_s[i][c]`` and ``upload_s[i][c]`` are seconds at ``configs[c]``;
    ``output_bytes[i]`` and ``need_mb[i]`` do not depend on the configuration.
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

    @classmethod
    def predict(
        cls, dag: DAG, functions: Sequence[str], predictor: Predictor, configs: Sequence[int]
    ) -> NodeCosts:
        configs = tuple(configs)
        n = len(dag)
        input_bytes = [0.0] * n
        output_bytes = [0.0] * n
        exec_s: list[tuple[float, ...]] = []
        upload_s: list[tuple[float, ...]] = []
        need_mb = [0.0] * n
        none = tuple(0.0 for _ in configs)
        for i in range(n):
            input_bytes[i] = sum(output_bytes[p] for p in dag.dependencies[i])
            if i == dag.sink:
                exec_s.append(none)
                upload_s.append(none)
                continue
            function = functions[i]
            output_bytes[i] = predictor.output_bytes(function, input_bytes[i])
            exec_s.append(tuple(predictor.exec_time(function, input_bytes[i], m) for m in configs))
            if output_leaves_worker(dag, i):
                upload_s.append(tuple(predictor.transfer_time(output_bytes[i], m) for m in configs))
            else:
                upload_s.append(none)
            need_mb[i] = predictor.memory_need_mb(input_bytes[i], output_bytes[i])
        transfer = tuple(
            Line(predictor.transfer_time(0, m), predictor.transfer_time(2**20, m) / 2**20)
            for m in configs
        )
        return cls(
            configs=configs,
            exec_s=tuple(exec_s),
            upload_s=tuple(upload_s),
            input_bytes=tuple(input_bytes),
            output_bytes=tuple(output_bytes),
            need_mb=tuple(need_mb),
            known=tuple(predictor.knows(f) for f in functions),
            startup_s=tuple(predictor.startup_time(m) for m in configs),
            transfer=transfer,
        )

    def download_s(self, nbytes: float, column: int) -> float:
        if nbytes <= 0:
            return 0.0
        line = self.transfer[column]
        return line.intercept + line.slope * nbytes


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
