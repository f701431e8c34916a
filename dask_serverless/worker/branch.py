"""The state of one invocation as it walks its branch, and the state changes on it.

A ``Branch`` holds what the invocation knows: the run record, its store, the outputs it
keeps in memory for later tasks of the branch (``values``/``uses``), the outputs it did
not store because no other worker reads them (``unstored``), the in-memory parent counts
of a bundle's internal nodes (``remaining``), the events not yet flushed, and the run's
load as Redis last reported it. The loop (``worker.loop``) calls its methods; nothing
here decides what to run next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dask.sizeof import sizeof

from dask_serverless.constants import DEFAULT_LEASE_MS, LARGE_ARGUMENT_BYTES
from dask_serverless.graph import DAG
from dask_serverless.protocol import events
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.record import OUTPUT, RunRecord, RunSigner
from dask_serverless.protocol.store import RunStore
from dask_serverless.storage.s3 import LargeOutputStore
from dask_serverless.storage.serialize import SignedParts
from dask_serverless.worker.cache import OutputCache

# Events are flushed at most this often: a chain of tiny tasks must not pay a Redis
# round trip per task for progress reporting.
EVENT_FLUSH_S = 0.1


class MemoryProbe(Protocol):
    """Peak memory of the work done since the last ``reset`` (``worker.metrics``)."""

    def reset(self) -> None: ...

    def peak_mb(self) -> float: ...


class DelayClock(Protocol):
    """Seconds the branch's thread has waited, runnable, for a CPU (``worker.metrics``)."""

    def seconds(self) -> float: ...

    def close(self) -> None: ...


class Invoker(Protocol):
    """How a worker starts other workers; provided by the backend that started it."""

    def invoke(self, invocations: Sequence[Invocation]) -> None: ...


class MissingOutputError(RuntimeError):
    """An input a task needs is not in Redis although the run is still alive."""


class RunGone(Exception):
    """The run was finished, failed or cancelled meanwhile: stop quietly."""


class OutputTooLargeError(ValueError):
    """A task's output is over ``serverless.max-output-bytes`` and cannot be stored."""


@dataclass
class Branch:
    """The state of one invocation as it walks its branch."""

    record: RunRecord
    store: RunStore
    signer: RunSigner
    invoker: Invoker
    worker_id: str
    invocation_id: str = ""
    lease_ms: int = DEFAULT_LEASE_MS
    cancelled: Callable[[], bool] = field(default=lambda: False)
    lease_held: bool = True
    large_outputs: LargeOutputStore | None = None
    time_left_ms: Callable[[], int] | None = None
    handoff_margin_ms: int = 0
    done_before: Sequence[int] = ()
    # This invocation's configuration and start, and a hook called before every task
    # (the local backend notes the running task there, to report an out-of-memory kill).
    memory_mb: int | None = None
    cold: bool = False
    on_task: Callable[[Branch, int], None] | None = None
    # Measures each task's peak memory; the backend's probe, or none.
    memory_probe: MemoryProbe | None = None
    # Reads the run delay of the thread that follows the branch (set by ``run_branch``).
    run_delay: DelayClock | None = None
    cache: OutputCache | None = None
    values: dict[int, Any] = field(default_factory=dict)
    clustered: set[int] = field(default_factory=set)
    uses: dict[int, int] = field(default_factory=dict)
    unstored: set[int] = field(default_factory=set)
    remaining: dict[int, int] = field(default_factory=dict)
    completed: list[int] = field(default_factory=list)
    pending_events: list[events.Event] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)
    sizes: dict[int, int] = field(default_factory=dict)
    # The run's load as Redis last reported it, plus the invocations made since.
    load: int | None = None
    load_checked: float = field(default_factory=time.monotonic)
    # When the invocation began its branch (``WorkerLogic.keeps_local``).
    began: float = field(default_factory=time.monotonic)
    # The bottom of the branch's queue that can never be handed on, as last seen
    # (``worker.loop``'s ``fixed_bottom``).
    fixed_bottom: list[int] = field(default_factory=list)

    @property
    def dag(self) -> DAG:
        return self.record.dag

    def count_local(self, child: int) -> bool:
        """Count one finished parent of an internal ``child``; True when it is ready."""
        remaining = self.remaining.get(child)
        if remaining is None:
            parents = self.dag.dependencies[child]
            remaining = len(parents) - len(set(parents).intersection(self.done_before))
        remaining -= 1
        self.remaining[child] = remaining
        return remaining == 0

    def hold(self, index: int, value: Any, consumers: int) -> None:
        """Keep ``value`` in memory for ``consumers`` more tasks of this invocation."""
        if consumers:
            self.values[index] = value
            self.uses[index] = consumers

    def take_held(self, index: int) -> Any:
        value = self.values[index]
        self.uses[index] -= 1
        if self.uses[index] <= 0:
            del self.values[index], self.uses[index]
        return value

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
        if batch is not None and not self.store.append_events(batch):
            raise RunGone()

    def spare_capacity(self) -> int | None:
        """Invocations the platform could still start at once; None when unknown."""
        if self.record.concurrency is None or self.load is None:
            return None
        return self.record.concurrency - self.load

    def note_load(self, load: int) -> None:
        self.load = load
        self.load_checked = time.monotonic()

    def invoke(self, children: Sequence[int]) -> None:
        """One new worker per child, in its planned configuration."""
        self.send(
            [
                Invocation.new(
                    self.record.run_id,
                    [child],
                    self.store.ttl_s,
                    self.lease_ms,
                    memory_mb=self.record.memory_of(child),
                )
                for child in children
            ]
        )

    def send(self, invocations: Sequence[Invocation]) -> None:
        """Invoke ``invocations``, noting them as queued first: they count in the run's
        load, and should Redis lose them before they begin, the client sends them again."""
        if not invocations:
            return
        if not self.store.note_invoked(invocations):
            raise RunGone()
        if self.load is not None:
            self.load += len(invocations)
        self.invoker.invoke(invocations)

    def cached(self, index: int) -> tuple[bool, Any]:
        """An output this instance already holds from an earlier task of the run."""
        if self.cache is None:
            return False, None
        found, value, size = self.cache.get(self.record.run_id, index)
        if found:
            self.sizes[index] = size
        return found, value

    def remember(self, index: int, value: Any) -> None:
        if self.cache is not None:
            self.cache.put(self.record.run_id, index, value, self.size_of(index, value))

    def size_of(self, index: int, value: Any) -> int:
        """``dask.sizeof`` of node ``index``'s output, computed once per invocation.

        Sizing a pandas frame builds a Series per column (0.1-0.2 ms for a small frame;
        ~7 ms for a shuffle's group result, a dict of some 40 frames, which each of its
        readers used to size again). A task's output is sized for its metrics, its
        consumers' metrics, clustering and the cache, so it is remembered, and it travels
        with the stored output (``output_blob``, ``open_output``) and in the cache: no
        other worker sizes it again.
        """
        size = self.sizes.get(index)
        if size is None:
            size = self.sizes[index] = int(sizeof(value))
        return size

    def fits(self, index: int) -> bool:
        """Whether node ``index`` may run in this invocation's configuration."""
        wanted = self.record.memory_of(index)
        return wanted is None or self.memory_mb is None or wanted == self.memory_mb

    # -- platform limits: large outputs, the invocation's time limit -------------------

    def output_blob(self, index: int, value: Any) -> bytes | SignedParts:
        """The signed output to store in Redis, or a pointer to where the store put it.

        The blob holds ``(size, value)``: the producer's ``size_of``, which the reader
        takes instead of sizing the value again (``open_output``). A large one stays in
        parts: Redis receives its arrays straight from their memory.
        """
        parts = self.signer.dumps_parts((self.size_of(index, value), value), OUTPUT, index)
        if self.large_outputs is not None:
            return self.large_outputs.offload(self.record.run_id, index, bytes(parts))
        return parts if len(parts) >= LARGE_ARGUMENT_BYTES else bytes(parts)

    def open_output(self, index: int, blob: bytes) -> Any:
        """The output of node ``index`` from what Redis held for it (``output_blob``),
        checked against this run's secret before anything is unpickled; its size is
        noted as the producer measured it."""
        if self.large_outputs is not None:
            blob = self.large_outputs.resolve(self.record.run_id, blob)
        label = f"output of {self.dag.keys[index]!r} (key {self.store.keys.output(index)})"
        size, value = self.signer.loads(blob, OUTPUT, index, label)
        self.sizes[index] = size
        return value

    def time_is_short(self) -> bool:
        """Whether the platform's time limit is less than ``handoff_margin_ms`` away."""
        return self.time_left_ms is not None and self.time_left_ms() < self.handoff_margin_ms
