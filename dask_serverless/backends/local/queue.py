"""The local platform's queue of invocations waiting for an instance."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from dask_serverless.protocol.invocation import Invocation


class InvocationQueue:
    """Queued invocation payloads: one FIFO per configuration (memory MB)."""

    def __init__(self, default_memory_mb: int) -> None:
        self.default_memory_mb = default_memory_mb
        self._fifos: dict[int, deque[Invocation]] = {}

    def memory_of(self, invocation: Invocation) -> int:
        return invocation.memory_mb or self.default_memory_mb

    def _fifo(self, invocation: Invocation) -> deque[Invocation]:
        return self._fifos.setdefault(self.memory_of(invocation), deque())

    def extend(self, invocations: Sequence[Invocation]) -> None:
        for invocation in invocations:
            self._fifo(invocation).append(invocation)

    def appendleft(self, invocation: Invocation) -> None:
        self._fifo(invocation).appendleft(invocation)

    def popleft(self, memory_mb: int) -> Invocation | None:
        fifo = self._fifos.get(memory_mb)
        return fifo.popleft() if fifo else None

    def drop_run(self, run_id: str) -> None:
        """Forget every queued invocation of ``run_id`` (it was cancelled)."""
        for memory, fifo in self._fifos.items():
            self._fifos[memory] = deque(i for i in fifo if i.run_id != run_id)

    def drop_memory(self, memory_mb: int) -> None:
        """Forget every queued invocation of configuration ``memory_mb``."""
        self._fifos.pop(memory_mb, None)

    def counts(self) -> dict[int, int]:
        return {memory: len(fifo) for memory, fifo in self._fifos.items() if fifo}

    def clear(self) -> None:
        self._fifos.clear()

    def __len__(self) -> int:
        return sum(len(fifo) for fifo in self._fifos.values())
