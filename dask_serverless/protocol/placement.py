"""Where a task's output must go: the rule the workers follow and the planner simulates.

An output is stored in Redis only if some consumer may run in another worker. Internal
children of a bundle always run in the bundle's worker, and so does the first child that
has the node as its only dependency (the worker continues with it) — or all of them when
the output is *clustered* (too large to move, or no room on the platform). A fan-in child
may run anywhere, so its inputs must be stored.
"""

from __future__ import annotations

from dask_serverless.graph import DAG


def output_leaves_worker(
    dag: DAG, index: int, internal: frozenset[int] = frozenset(), clustered: bool = False
) -> bool:
    """Whether node ``index``'s output may be read by another worker."""
    external_single = 0
    for child in dag.dependents[index]:
        if child in internal:
            continue
        if len(dag.dependencies[child]) > 1:
            return True
        external_single += 1
    return external_single > 1 and not clustered
