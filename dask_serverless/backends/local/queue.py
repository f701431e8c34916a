"""The local platform's queue of invocations waiting for an instance."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from dask_serverless.protocol.invocation import Invocation


class InvocationQueue:
    """Queued invocations in arrival order (a redelivery goes first), each numbered so
    the dispatcher can take any of them out."""

    def __init__(self, default_memory_mb: int) -> None:
        self.default_memory_mb = default_memory_mb
        self._queued: dict[int, Invocation] = {}
        self._first = 0
        self._last = 0

    def memory_of(self, invocation: Invocation) -> int:
        return invocation.memory_mb or self.default_memory_mb

    def extend(self, invocations: Sequence[Invocation]) -> None:
        for invocation in invocations:
            self._last += 1
            self._queued[self._last] = invocation

    def appendleft(self, invocation: Invocation) -> None:
        self._first -= 1
        self._queued = {self._first: invocation, **self._queued}

    def oldest(self, count: int) -> list[tuple[int, Invocation]]:
        """The ``count`` oldest ``(number, invocation)`` pairs (a copy: safe to remove from)."""
        return list(itertools.islice(self._queued.items(), count))

    def remove(self, number: int) -> None:
        self._queued.pop(number, None)

    def clear(self) -> None:
        self._queued.clear()

    def __len__(self) -> int:
        return len(self._queued)
