"""The branch loop a worker runs for one invocation, and the hooks that shape it.

An invocation names a run and the node(s) it starts with. The worker follows a *branch*:

1. **gather** the node's inputs — outputs it still holds in memory, the rest with one
   ``MGET`` from Redis;
2. **execute** the node's task-spec with those inputs;
3. **publish**: decide whether the output must be stored (only if a consumer may run in
   another worker), then one atomic script stores it, appends the batched events and counts
   this node once in the inbox of every fan-in child, claiming those it completes (I-3).
   Children with this node as their only dependency are ready without asking Redis;
4. **split** the ready children: continue with one here, keeping the output in memory, and
   invoke new workers for the others in one concurrent batch.

The loop ends when no ready child is left, when a task fails (its exception is recorded and
the client told), when the run is gone (finished, failed or cancelled — every script reports
that), or at the sink: the worker that reaches it stores the result, deletes every
intermediate key of the run and announces ``finished``.

A chain therefore runs in one worker with no Redis round trip per task; events are flushed
at most every ``EVENT_FLUSH_S`` seconds (which is also how soon a chain notices a cancelled
run). ``WorkerLogic`` holds the four stages as methods so a planner's optimisation can
override one stage without forking the loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dask_serverless import events
from dask_serverless.graph import DAG
from dask_serverless.storage.redis import RunStore
from dask_serverless.storage.serialize import Signer

EVENT_FLUSH_S = 0.1


@dataclass(frozen=True)
class RunRecord:
    """Everything a worker needs to know about a run, stored once by the client."""

    run_id: str
    dag: DAG


class Invoker(Protocol):
    """How a worker starts other workers; provided by the backend that started it."""

    def invoke(self, payloads: Sequence[dict]) -> None: ...


def invocation(run_id: str, tasks: Sequence[int], ttl_s: int, invocation_id: str) -> dict:
    """The payload of one invocation: plain JSON, no secret, no Redis address (I-5)."""
    return {"run": run_id, "id": invocation_id, "tasks": list(tasks), "ttl": ttl_s}


class MissingOutputError(RuntimeError):
    """An input a task needs is not in Redis although the run is still alive."""


class RunGone(Exception):
    """The run was finished, failed or cancelled meanwhile: stop quietly."""


@dataclass
class Branch:
    """The state of one invocation as it walks its branch."""

    record: RunRecord
    store: RunStore
    signer: Signer
    invoker: Invoker
    worker_id: str
    new_invocation_id: Any
    values: dict[int, Any] = field(default_factory=dict)
    pending_events: list[events.Event] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)

    @property
    def dag(self) -> DAG:
        return self.record.dag

    def take_events(self) -> bytes | None:
        if not self.pending_events:
            return None
        batch = events.encode(self.pending_events)
        self.pending_events.clear()
        self.last_flush = time.monotonic()
        return batch

    def flush_if_due(self) -> None:
        if self.pending_events and time.monotonic() - self.last_flush > EVENT_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        batch = self.take_events()
        if batch is not None and not self.store.flush_events(batch):
            raise RunGone()

    def invoke(self, children: Sequence[int]) -> None:
        if not children:
            return
        payloads = [
            invocation(self.record.run_id, [child], self.store.ttl_s, self.new_invocation_id())
            for child in children
        ]
        self.invoker.invoke(payloads)


def output_leaves_worker(dag: DAG, index: int) -> bool:
    """Whether node ``index``'s output may be read by another worker.

    Only a node with exactly one dependent that has no other dependency is sure to be
    consumed where it was computed.
    """
    children = dag.dependents[index]
    return not (len(children) == 1 and len(dag.dependencies[children[0]]) == 1)


class WorkerLogic:
    """The four stages of the branch loop. Subclass and override a stage to optimise it."""

    def gather(self, branch: Branch, index: int) -> dict[int, Any]:
        """Inputs of ``index`` by parent index: held values first, then one MGET."""
        parents = branch.dag.dependencies[index]
        inputs = {p: branch.values[p] for p in parents if p in branch.values}
        remote = [p for p in parents if p not in inputs]
        for parent, blob in zip(remote, branch.store.fetch_outputs(remote), strict=True):
            if blob is None:
                raise MissingOutputError(
                    f"output of {branch.dag.keys[parent]!r} is missing from Redis"
                )
            inputs[parent] = branch.signer.loads(blob, f"output of {branch.dag.keys[parent]!r}")
        for parent in parents:
            branch.values.pop(parent, None)
        return inputs

    def execute(self, branch: Branch, index: int, inputs: dict[int, Any]) -> Any:
        dag = branch.dag
        node = dag.nodes[index]
        assert node is not None
        return node({dag.keys[p]: value for p, value in inputs.items()})

    def publish(self, branch: Branch, index: int, value: Any) -> list[int]:
        """Store the output if needed, count it in fan-in inboxes; return ready children."""
        dag = branch.dag
        children = dag.dependents[index]
        ready = [c for c in children if len(dag.dependencies[c]) == 1]
        fan_in = [(c, len(dag.dependencies[c])) for c in children if len(dag.dependencies[c]) > 1]
        leaves = output_leaves_worker(dag, index)
        if not leaves and not fan_in:
            branch.flush_if_due()
            return ready
        blob = branch.signer.dumps(value) if leaves else None
        won = branch.store.complete(index, blob, fan_in, branch.take_events())
        if won is None:
            raise RunGone()
        return ready + won

    def split(self, branch: Branch, index: int, ready: list[int]) -> tuple[list[int], list[int]]:
        """(children to continue with here, children to hand to new workers)."""
        return ready[:1], ready[1:]


def run_branch(branch: Branch, starts: Sequence[int], logic: WorkerLogic) -> None:
    """Follow the branch from ``starts`` until it ends; see the module docstring."""
    dag = branch.dag
    stack = list(starts)
    try:
        while stack:
            index = stack.pop()
            started = time.time()
            try:
                inputs = logic.gather(branch, index)
                if index == dag.sink:
                    finish_run(branch, inputs)
                    return
                value = logic.execute(branch, index, inputs)
            except RunGone:
                raise
            except Exception as exc:
                fail_run(branch, index, exc)
                return
            branch.pending_events.append(
                events.done(index, branch.worker_id, started, time.time() - started)
            )
            ready = logic.publish(branch, index, value)
            here, elsewhere = logic.split(branch, index, ready)
            branch.invoke(elsewhere)
            if here:
                branch.values[index] = value
            stack.extend(here)
        branch.flush()
    except RunGone:
        return


def fail_run(branch: Branch, index: int, exc: BaseException) -> None:
    """Record ``exc`` as the run's error (first one wins) and tell the client."""
    branch.pending_events.append(events.error(index))
    batch = branch.take_events()
    assert batch is not None
    branch.store.fail(branch.signer.dumps_exception(exc), batch)


def finish_run(branch: Branch, inputs: dict[int, Any]) -> None:
    """At the sink: store the result, delete the run's intermediates, announce it."""
    dag = branch.dag
    result = tuple(inputs[i] for i in dag.requested)
    store = branch.store
    if not store.seal(branch.signer.dumps(result)):
        return
    intermediates = store.run_keys(len(dag))
    store.delete(k for k in intermediates if k not in (store.result_key, store.events_key))
    branch.pending_events.append(events.finished())
    batch = branch.take_events()
    assert batch is not None
    store.announce(batch)
