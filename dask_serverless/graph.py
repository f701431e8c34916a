"""Translate what dask hands a get function into our immutable ``DAG``.

Dask gives a scheduler an expression (anything with ``__dask_graph__``), a
``HighLevelGraph``, or a plain mapping whose values are task-spec nodes (``Task``,
``Alias``, ``DataNode`` …) or legacy tuples. We normalise all of them with dask's own
``convert_legacy_graph``, keep only what the requested keys need, order it
topologically and number the nodes ``0 … n-1``. Workers and Redis then speak of nodes by
index: short keys, and no dask key ever has to be rendered into a Redis key.

A synthetic *sink* node, always the last index, depends on every requested key: the run
finishes exactly when the sink runs, however many keys were asked for.

Every traversal here is an explicit loop with a stack or queue, so a 100 000-task chain
translates without touching the recursion limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dask._task_spec import Alias, DataNode, GraphNode, convert_legacy_graph
from dask.core import flatten

Key = Hashable

SINK_NAME = "dask-serverless-sink"


class CycleError(ValueError):
    """The graph has a dependency cycle, so no order of its tasks can run it."""


@dataclass(frozen=True)
class DAG:
    """A run's tasks, numbered in topological order; the last node is the sink.

    ``nodes[i]`` is the task-spec node that computes ``keys[i]`` (``None`` for the sink).
    ``dependencies[i]`` and ``dependents[i]`` are node indices.
    """

    keys: tuple[Key, ...]
    nodes: Sequence[GraphNode | None]
    dependencies: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]
    index: dict[Key, int] = field(repr=False, compare=False)
    annotations: dict[str, dict[int, Any]] = field(default_factory=dict, repr=False)

    @property
    def sink(self) -> int:
        return len(self.keys) - 1

    @property
    def roots(self) -> list[int]:
        return [i for i, deps in enumerate(self.dependencies) if not deps]

    @property
    def requested(self) -> tuple[int, ...]:
        """Indices of the requested keys, in the order the sink receives them."""
        return self.dependencies[self.sink]

    def __len__(self) -> int:
        return len(self.keys)

    def annotation(self, index: int, name: str, default: Any = None) -> Any:
        """The ``dask.annotate(name=…)`` value of node ``index``, if it has one."""
        return self.annotations.get(name, {}).get(index, default)


def as_task_graph(dsk: Any) -> dict[Key, GraphNode]:
    """Any graph form dask hands a get function, as a dict of task-spec nodes."""
    if not isinstance(dsk, Mapping):
        if not hasattr(dsk, "__dask_graph__"):
            raise TypeError(f"expected a dask graph or collection, got {type(dsk).__name__}")
        dsk = dsk.__dask_graph__()
    return convert_legacy_graph(dsk)


def graph_annotations(dsk: Any) -> dict[str, dict[Key, Any]]:
    """``dask.annotate`` values by annotation name and key, from any graph form.

    Expressions report them through ``__dask_annotations__``; a HighLevelGraph keeps them
    on its layers; a plain dict has none.
    """
    if hasattr(dsk, "__dask_annotations__"):
        return dict(dsk.__dask_annotations__())
    found: dict[str, dict[Key, Any]] = {}
    for layer in getattr(dsk, "layers", {}).values():
        for name, value in (getattr(layer, "annotations", None) or {}).items():
            found.setdefault(name, {}).update(
                {key: value(key) if callable(value) else value for key in layer}
            )
    return found


def requested_keys(keys: Any) -> list[Key]:
    """The flat, de-duplicated list of keys in a (possibly nested) ``keys`` argument."""
    flat = flatten(keys) if isinstance(keys, list) else [keys]
    return list(dict.fromkeys(flat))


def literal_value(graph: Mapping[Key, GraphNode], key: Key) -> tuple[bool, Any]:
    """``(True, value)`` when ``key`` is plain data — a ``DataNode``, or aliases of one.

    Such a key needs no worker: the client answers it with the object itself, as dask's
    own schedulers do (``delayed(obj).compute() is obj``).
    """
    node = graph.get(key)
    seen = set()
    while isinstance(node, Alias) and node.key not in seen:
        seen.add(node.key)
        node = graph.get(node.target)
    if isinstance(node, DataNode):
        return True, node.value
    return False, None


def literal_values(graph: Mapping[Key, GraphNode], wanted: Iterable[Key]) -> dict[Key, Any]:
    """The requested keys that are plain data, with their values (see ``literal_value``)."""
    found = {}
    for key in wanted:
        is_literal, value = literal_value(graph, key)
        if is_literal:
            found[key] = value
    return found


def needed_subgraph(graph: Mapping[Key, GraphNode], wanted: Iterable[Key]) -> dict[Key, GraphNode]:
    """Only the nodes the ``wanted`` keys depend on, transitively."""
    needed: dict[Key, GraphNode] = {}
    stack = list(wanted)
    while stack:
        key = stack.pop()
        if key in needed:
            continue
        node = graph.get(key)
        if node is None:
            raise KeyError(key)
        needed[key] = node
        stack.extend(node.dependencies)
    return needed


def topological_order(graph: Mapping[Key, GraphNode]) -> list[Key]:
    """Kahn's algorithm; raises CycleError naming a key on a cycle."""
    remaining = {key: len(node.dependencies) for key, node in graph.items()}
    dependents: dict[Key, list[Key]] = {key: [] for key in graph}
    for key, node in graph.items():
        for dep in node.dependencies:
            dependents[dep].append(key)
    ready = deque(key for key, count in remaining.items() if count == 0)
    order: list[Key] = []
    while ready:
        key = ready.popleft()
        order.append(key)
        for child in dependents[key]:
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    if len(order) != len(graph):
        stuck = next(key for key, count in remaining.items() if count > 0)
        raise CycleError(f"the graph has a cycle through key {stuck!r}")
    return order


def check_annotations(dag: DAG) -> None:
    """Refuse annotations the run could not honour, naming the annotation and the key.

    ``retries`` must be a whole number >= 0 and ``memory`` a positive number of MB; a bad
    value fails here, before anything is sent, not deep inside a worker.
    """
    for index, value in dag.annotations.get("retries", {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"dask.annotate(retries={value!r}) on task {dag.keys[index]!r}: retries "
                "must be a whole number >= 0"
            )
    for index, value in dag.annotations.get("memory", {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(
                f"dask.annotate(memory={value!r}) on task {dag.keys[index]!r}: memory "
                "must be a positive number of MB"
            )


def translate(
    dsk: Any, keys: Any, run_token: str = "", graph: Mapping[Key, GraphNode] | None = None
) -> DAG:
    """Build the DAG that computes ``keys`` (a key or a nested list of keys) from ``dsk``.

    ``graph`` is ``dsk`` already converted by ``as_task_graph``, when the caller has it.
    Raises ``KeyError`` for a requested key (or a dependency) missing from the graph and
    ``CycleError`` for a cyclic graph — both before anything is dispatched.
    """
    graph = as_task_graph(dsk) if graph is None else graph
    wanted = requested_keys(keys)
    needed = needed_subgraph(graph, wanted)
    order = topological_order(needed)
    index = {key: i for i, key in enumerate(order)}
    sink_key = (SINK_NAME, run_token)
    position = index.__getitem__
    dependencies = [tuple(map(position, needed[key].dependencies)) for key in order]
    dependencies.append(tuple(index[key] for key in wanted))
    dependents: list[list[int]] = [[] for _ in dependencies]
    for child, deps in enumerate(dependencies):
        for parent in deps:
            dependents[parent].append(child)
    index[sink_key] = len(order)
    annotations = {
        name: {index[key]: value for key, value in values.items() if key in needed}
        for name, values in graph_annotations(dsk).items()
    }
    dag = DAG(
        keys=(*order, sink_key),
        nodes=(*(needed[key] for key in order), None),
        dependencies=tuple(dependencies),
        dependents=tuple(tuple(children) for children in dependents),
        index=index,
        annotations={name: values for name, values in annotations.items() if values},
    )
    check_annotations(dag)
    return dag
