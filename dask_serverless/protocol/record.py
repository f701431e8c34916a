"""The run record — everything a worker needs to know about a run — and how blobs of a
run are signed.

The client builds one ``RunRecord`` per run, seals it (cloudpickle, zlib, a keyed-BLAKE3
MAC) and stores it under the run's ``record`` key; a worker opens it once per process and
run. Every other blob of the run (outputs, the first error, the result) is signed the
same way through a ``RunSigner``. Each MAC is bound to the blob's place — run id, *kind*
and *slot* (the node index, for outputs; see ``blob_context``) — which the reader names
again, so a validly signed blob copied to another key, run or kind is refused with
``UntrustedBlobError`` naming the key it was found under.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

from dask._task_spec import DataNode, GraphNode, Task
from dask.sizeof import sizeof

from dask_serverless.graph import DAG
from dask_serverless.storage.serialize import Nested, SignedParts, Signer, UntrustedBlobError

# Kinds of signed blob in a run.
RECORD = "run record"
OUTPUT = "output"
ERROR = "task error"
RESULT = "run result"
LITERAL = "graph literal"

# Consecutive nodes pickled together in a sealed record (``PackedNodes``): a worker
# unpickles a part at the first use of one of its nodes.
NODES_PER_PART = 1024
# Containers longer than this are sized as a whole (dask.sizeof samples them), not walked.
_WALKED_ITEMS = 64


@dataclass(frozen=True)
class RunRecord:
    """Everything a worker needs to know about a run, stored once by the client."""

    run_id: str
    dag: DAG
    retries: int = 0
    retry_backoff_s: float = 0.1
    max_output_bytes: int = 512 * 2**20
    # Nodes of a bundle whose dependencies all run in the same invocation: counted in the
    # worker's memory, never in Redis (see ``dask_serverless.planning.bundling``).
    internal: frozenset[int] = frozenset()
    # Outputs at least this large are not fanned out: their single-dependency children
    # run in the worker that holds them (WUKONG's task clustering).
    cluster_output_bytes: int = 2**20
    # The configuration (memory MB) the plan gives each node, None for "any" (the sink);
    # no plan: every node runs wherever it is ready (see ``dask_serverless.planning``).
    memory: tuple[int | None, ...] | None = None
    # The platform's concurrency limit, when known. Workers then invoke new workers for
    # ready children only while the run's load (running plus queued invocations) is below
    # it, and run the others themselves: an invocation that would only wait in the
    # platform's queue costs more than running its task here. Unknown (AWS Lambda scales
    # out): every ready child beyond the first gets a new worker, as in WUKONG.
    concurrency: int | None = None
    # Nodes that carry literal data too large to ride in the record (persisted chunks,
    # alone or fused into the task that reads them): each node is stored once per run
    # under its own key and read only by the worker that runs it
    # (see ``split_large_literals``).
    literals: frozenset[int] = frozenset()
    # A run whose whole predicted work is worth less than a second invocation: the task
    # seconds that prediction allows an invocation. While its tasks stay within them, a
    # worker runs every ready child itself; past them (a task's time may depend on more
    # than history saw) it hands what is left on to new workers.
    keep_local_s: float | None = None

    def memory_of(self, index: int) -> int | None:
        return None if self.memory is None else self.memory[index]

    def planned_memory(self, tasks: tuple[int, ...] | list[int]) -> int | None:
        """The configuration an invocation starting with ``tasks`` needs (the largest)."""
        if self.memory is None:
            return None
        return max((self.memory[t] or 0 for t in tasks), default=0) or None


class PackedNodes(Sequence[GraphNode | None]):
    """A sealed record's task nodes, kept as pickled parts and rebuilt one by one when a
    worker runs them.

    Unpickling a dask ``Task`` calls its ``__setstate__`` in Python, some 10 µs a node;
    every instance that serves a run opens the whole record, but runs a few of its nodes.
    A ``Task`` is packed as ``(class, state)`` and rebuilt as pickle rebuilds it; any
    other node (``DataNode``, ``Alias``) stays as it is. The packed nodes travel in parts
    of ``NODES_PER_PART`` consecutive nodes, each a pickle of its own unpickled at its
    first use: an instance running one bundle of a 200 000-task run unpickles the parts
    holding that bundle's nodes, not all of them. The parts are inside the signed record,
    so nothing unverified is ever rebuilt (I-5, ``storage.serialize.Nested``).
    """

    def __init__(self, parts: Sequence[Nested], length: int) -> None:
        self._parts = tuple(parts)
        self._length = length
        self._unpacked: dict[int, list[tuple[type[Task] | None, Any]]] = {}
        self._built: dict[int, GraphNode | None] = {}

    @classmethod
    def of(cls, nodes: Sequence[GraphNode | None]) -> PackedNodes:
        parts = [
            Nested.of([_packed(node) for node in nodes[start : start + NODES_PER_PART]])
            for start in range(0, len(nodes), NODES_PER_PART)
        ]
        return cls(parts, len(nodes))

    def __reduce__(self) -> tuple[Any, ...]:
        return (PackedNodes, (self._parts, self._length))

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> GraphNode | None: ...

    @overload
    def __getitem__(self, index: slice) -> list[GraphNode | None]: ...

    def __getitem__(self, index: int | slice) -> GraphNode | None | list[GraphNode | None]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = index + self._length if index < 0 else index
        if not 0 <= position < self._length:
            raise IndexError(f"node {index} of {self._length}")
        if position not in self._built:
            part, offset = divmod(position, NODES_PER_PART)
            unpacked = self._unpacked.get(part)
            if unpacked is None:
                unpacked = self._unpacked[part] = self._parts[part].value()
            cls, state = unpacked[offset]
            if cls is None:
                self._built[position] = state
            else:
                task = cls.__new__(cls)
                task.__setstate__(state)
                self._built[position] = task
        return self._built[position]


def _packed(node: GraphNode | None) -> tuple[type[Task] | None, Any]:
    """``(class, state)`` of a ``Task`` pickled the default way (``__getstate__``), else
    ``(None, node)``."""
    if isinstance(node, Task):
        cls = type(node)
        if cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__:
            return cls, node.__getstate__()
    return None, node


def blob_context(run_id: str, kind: str, slot: int | None = None) -> bytes:
    """Where a blob belongs — run, kind, slot — as the bytes its MAC is bound to."""
    return f"{run_id}|{kind}|{'' if slot is None else slot}".encode()


class RunSigner:
    """Signs and checks the blobs of one run, each bound to its kind and slot."""

    def __init__(self, signer: Signer, run_id: str) -> None:
        self.signer = signer
        self.run_id = run_id

    def dumps(self, value: Any, kind: str, slot: int | None = None) -> bytes:
        return self.signer.dumps(value, context=blob_context(self.run_id, kind, slot))

    def dumps_parts(self, value: Any, kind: str, slot: int | None = None) -> SignedParts:
        """``dumps``, as the parts of the blob (see ``SignedParts``)."""
        return self.signer.dumps_parts(value, context=blob_context(self.run_id, kind, slot))

    def loads(
        self, blob: bytes, kind: str, slot: int | None = None, label: str | None = None
    ) -> Any:
        """The value of ``blob``; ``label`` names it in errors (``output of 'x'``)."""
        return self.signer.loads(blob, label or kind, context=blob_context(self.run_id, kind, slot))

    def dumps_exception(self, exc: BaseException) -> bytes:
        return self.signer.dumps_exception(exc, context=blob_context(self.run_id, ERROR))


def literal_bytes(node: Any, limit: int) -> int:
    """Roughly how many bytes of data ``node`` carries, counted until ``limit`` is reached.

    Walks the task's arguments, the values of ``DataNode`` s and the subgraphs fused into
    it (an optimized array graph inlines persisted chunks into the tasks that read them);
    a long container is measured by ``dask.sizeof`` as a whole rather than walked.
    """
    total = 0
    stack = [node]
    while stack and total < limit:
        obj = stack.pop()
        if isinstance(obj, DataNode):
            stack.append(obj.value)
        elif isinstance(obj, GraphNode):
            stack.extend(getattr(obj, "args", ()))
            stack.extend(getattr(obj, "kwargs", {}).values())
        elif isinstance(obj, (list, tuple, set, frozenset)) and len(obj) <= _WALKED_ITEMS:
            stack.extend(obj)
        elif isinstance(obj, dict) and len(obj) <= _WALKED_ITEMS:
            stack.extend(obj.values())
        else:
            total += sizeof(obj)
    return total


def split_large_literals(dag: DAG, min_bytes: int) -> tuple[DAG, dict[int, Any]]:
    """``dag`` without the nodes that carry large literals, and those nodes by index.

    A persisted array is a graph of literals, and optimization fuses each chunk into the
    task that reads it. Inside the record, every worker would load all of them to run any
    task. Taken out, the record stays small and each such node is read only by the worker
    that runs it. The node keeps its place in the DAG (its dependents count it like any
    parent) with an empty ``DataNode`` standing in for it in the record.
    """
    taken: dict[int, Any] = {}
    nodes = list(dag.nodes)
    for index, node in enumerate(dag.nodes):
        if node is not None and literal_bytes(node, min_bytes) >= min_bytes:
            taken[index] = node
            nodes[index] = DataNode(node.key, None)
    if not taken:
        return dag, taken
    return replace(dag, nodes=tuple(nodes), index=dag.index), taken


def seal_record(signer: Signer, record: RunRecord) -> bytes:
    """The signed, compressed record (its nodes packed, ``PackedNodes``); a task that
    cannot be pickled is named in the error."""
    try:
        packed = replace(record, dag=replace(record.dag, nodes=PackedNodes.of(record.dag.nodes)))
        return signer.dumps(packed, compress=True, context=blob_context(record.run_id, RECORD))
    except Exception as error:
        dag = record.dag
        for index in range(dag.sink):
            try:
                signer.dumps(dag.nodes[index])
            except Exception as node_error:
                raise TypeError(
                    f"task {dag.keys[index]!r} cannot be pickled for the workers: {node_error}"
                ) from node_error
        raise TypeError(f"the run cannot be pickled for the workers: {error}") from error


def open_record(signer: Signer, blob: bytes, run_id: str) -> RunRecord:
    """The record ``blob`` holds, refused unless it is signed and is run ``run_id``'s."""
    record = signer.loads(blob, f"{RECORD} of run {run_id}", context=blob_context(run_id, RECORD))
    if not isinstance(record, RunRecord) or record.run_id != run_id:
        raise UntrustedBlobError(f"the {RECORD} stored for run {run_id} is not that run's")
    return record
