"""Data locality: which tasks run in the client, beside the literal data they read.

A persisted collection reaches a scheduler as literal data in the graph — chunks the
client already holds in memory. Any worker that runs a task on such a chunk first needs
the chunk moved to it: the client writes it to Redis, the worker reads it back, each side
signing or checking it. When the task itself costs less than that move (a reduction of an
in-memory chunk), the cheapest place to run it is where the data already is: in the
client, as dask's distributed scheduler places a task beside its inputs. Only the task's
output, usually small, then goes to Redis, and the rest of the DAG runs on the workers as
before.

``place_in_client`` decides it from the platform model: a task is placed in the client
when all its inputs are already there and its predicted execution time is at most the
predicted time of moving those inputs to a worker (``Predictor.transfer_time``, a write by
the client plus a read by the worker). Placed are, in topological order:

- roots carrying large literal data: plain data, or a task with the data fused in (an
  optimized array graph does that) whose own work is small by the rule;
- tasks whose dependencies are all placed and whose work is small by the rule, their
  inputs being the literal data or the outputs the placed tasks leave (as the predictor
  expects them: nothing known counts as small) — a reduction's cheap tree stays beside
  its data, an expensive task goes to the workers with the outputs it reads;
- a plain-data root only when some task reading it is placed;
- the sink, when all its inputs are placed (the rule again: it does no work, and its
  inputs would have to move to a worker). Every other node leads to the sink, so then
  the whole run is in the client and needs no worker at all: the client ends the run,
  deletes its keys and announces the end, as the sink's worker does, and keeps the
  result (``client.placed``).

A task with a dependency the workers compute stays on the workers (the client would have
to wait for it, and no client action may be needed after the roots are invoked: I-2), and
so does the sink then: a worker stores the result and deletes the run's keys, as always.
The client runs all placed tasks in one invocation of its own, in which the placed
non-roots are counted in memory like a bundle's internal nodes (``planning.bundling``);
``ClientPlacement.bundling`` takes them out of the workers' bundles.

The client runs its share right after invoking the workers' roots, one task after the
other, before it starts to wait: a compute's ``timeout`` is checked once that share is
done.

Time is predicted from history, where the client's own tasks are recorded at one vCPU
(``DEFAULT_MEMORY_MB``, what one client thread gets): a function without history counts
as cheap for its first run, and goes to the workers from then on if it was not. The
setting ``serverless.planning.client-tasks`` (or ``Scheduler(client_tasks=)``) turns
placement off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dask._task_spec import DataNode

from dask_serverless.constants import DEFAULT_MEMORY_MB
from dask_serverless.graph import DAG
from dask_serverless.planning.bundling import Bundling
from dask_serverless.planning.predict import Predictor

# A literal moves twice between the client and a worker: written by one, read by the other.
MOVES_PER_LITERAL = 2


@dataclass(frozen=True)
class ClientPlacement:
    """The tasks the client runs itself: ``roots`` start its invocation, ``consumers``
    are counted in its memory (the sink among them when ``whole_run``: no worker is
    needed); ``literal_bytes`` is the data they no longer move."""

    roots: tuple[int, ...] = ()
    consumers: frozenset[int] = frozenset()
    literal_bytes: int = 0
    whole_run: bool = False

    @property
    def nodes(self) -> frozenset[int]:
        return self.consumers.union(self.roots)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def bundling(self, dag: DAG, bundling: Bundling) -> Bundling:
        """``bundling`` without the placed nodes; the placed consumers become internal.

        A worker's bundle loses the placed roots; a node that was internal to it only
        through them is internal no longer (its parents now run in different
        invocations) — checked in index order, which is topological, so a loss
        propagates to the nodes internal through it.
        """
        if not self:
            return bundling
        placed = self.nodes
        bundle_of = [-1] * len(dag)
        starts: list[list[int]] = []
        for group in bundling.starts:
            kept = [root for root in group if root not in placed]
            for root in kept:
                bundle_of[root] = len(starts)
            if kept:
                starts.append(kept)
        internal = set(self.consumers)
        for index in sorted(bundling.internal - placed):
            parents = dag.dependencies[index]
            number = bundle_of[parents[0]]
            if number >= 0 and all(bundle_of[p] == number for p in parents):
                bundle_of[index] = number
                internal.add(index)
        return Bundling(starts, frozenset(internal))

    def note(self) -> str:
        tasks = len(self.nodes) - self.whole_run  # the sink is no task
        whole = ", and so does the rest of the run: no worker is needed" if self.whole_run else ""
        return (
            f"{tasks} tasks run in the client, beside their "
            f"{self.literal_bytes / 2**20:.1f} MiB of literal data (moving it to workers "
            f"would cost more than the tasks; serverless.planning.client-tasks){whole}"
        )


def place_in_client(
    dag: DAG,
    literal_sizes: Mapping[int, int],
    predictor: Predictor,
    functions: Sequence[str],
) -> ClientPlacement:
    """The tasks the client runs beside their literal data; see the module docstring.

    ``literal_sizes`` gives the bytes of literal data of the nodes that carry large
    literals; ``functions`` the function identity of every node. Decided before the plan,
    so that the planner plans the workers' part only: times are predicted at one vCPU
    (``DEFAULT_MEMORY_MB``), what one thread of the client gets.
    """

    def small(index: int, nbytes: float) -> bool:
        work_s = predictor.exec_time(functions[index], nbytes, DEFAULT_MEMORY_MB)
        moving_s = MOVES_PER_LITERAL * predictor.transfer_time(nbytes, DEFAULT_MEMORY_MB)
        return work_s <= moving_s

    literal_roots = {
        index: size
        for index, size in literal_sizes.items()
        if not dag.dependencies[index]
        and (isinstance(dag.nodes[index], DataNode) or small(index, size))
    }
    # Bytes each node placed so far leaves in the client (a predicted output: 0 unknown).
    held: dict[int, float] = dict(literal_roots)
    consumers = set()
    for index in range(len(dag)):  # index order is topological; the sink comes last
        parents = dag.dependencies[index]
        if not parents or not all(p in held for p in parents):
            continue
        nbytes = sum(held[p] for p in parents)
        if small(index, nbytes):
            consumers.add(index)
            held[index] = predictor.output_bytes(functions[index], nbytes)
    roots = sorted(
        root
        for root in literal_roots
        if not isinstance(dag.nodes[root], DataNode)
        or any(child in consumers for child in dag.dependents[root])
    )
    return ClientPlacement(
        tuple(roots),
        frozenset(consumers),
        sum(literal_roots[r] for r in roots),
        whole_run=dag.sink in consumers,
    )
