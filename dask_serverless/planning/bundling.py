"""Bundles: many cheap roots and the fan-ins among them in one invocation.

A dask graph often starts wide — thousands of leaves reduced by a tree. One invocation per
leaf pays a worker start and a Redis round trip for every task; a bundle runs a contiguous
group of roots in one invocation and everything *internal* to the group — a node with
several dependencies, all of them in the same bundle — without any Redis traffic: the
worker counts the internal node's parents in memory and keeps their values there. Only
the bundle's frontier (nodes consumed outside it) is stored and counted in Redis.

Fan-outs are not absorbed (a node with a single dependency joins a bundle only as the
only child of its parent): their children stay free to run in parallel workers. Bundles
are formed only when there are more roots than ``bundles``, which the client sizes to a
few per concurrent worker, so every worker still gets work.

An invocation runs at one configuration, so a bundle holds roots of one planned
configuration only: given the plan's ``memory``, roots are grouped by it first, and a
root planned at 512 MB never runs at 1769 MB because it was bundled with a larger one.

A graph whose whole predicted work is worth less than a second invocation is one bundle
(``bundles=1``): all its roots start in one invocation. Its fan-outs stay free: a task's
time may depend on more than history sees (its arguments). Its worker runs every ready
child itself while the run stays within the time its plan allows one invocation
(``RunRecord.keep_local_s``), and hands what is left on to new workers past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dask_serverless.graph import DAG


@dataclass(frozen=True)
class Bundling:
    """Start nodes of each bundle's invocation, and the nodes counted in memory."""

    starts: list[list[int]]
    internal: frozenset[int]


def bundle_roots(dag: DAG, bundles: int, memory: Sequence[int | None] | None = None) -> Bundling:
    """Group the roots (in index order, which keeps neighbours together) into ``bundles``,
    never mixing roots of different configurations (``memory[i]``, MB).

    With no more roots than ``bundles``, every root gets its own invocation.
    """
    roots = dag.roots
    if bundles < 1 or len(roots) <= bundles:
        return Bundling([[root] for root in roots], frozenset())
    size = -(-len(roots) // bundles)
    by_memory: dict[int | None, list[int]] = {}
    for root in roots:
        by_memory.setdefault(None if memory is None else memory[root], []).append(root)
    starts = [
        group[i : i + size] for group in by_memory.values() for i in range(0, len(group), size)
    ]
    starts.sort(key=lambda group: group[0])
    bundle_of = [-1] * len(dag)
    for number, group in enumerate(starts):
        for root in group:
            bundle_of[root] = number
    internal = set()
    for index, parents in enumerate(dag.dependencies):
        if not parents:
            continue
        number = bundle_of[parents[0]]
        if number < 0 or any(bundle_of[p] != number for p in parents):
            continue
        if len(parents) == 1 and len(dag.dependents[parents[0]]) > 1:
            continue
        bundle_of[index] = number
        internal.add(index)
    return Bundling(starts, frozenset(internal))
