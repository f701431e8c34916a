"""A warm instance's memory of task outputs it already holds, by run and node.

Serverless instances are reused, and a wide graph sends the same input to many tasks —
each chunk of a matrix product feeds a whole row of blocks. Without a cache, every one of
those tasks downloads, checks and unpickles the same blob again; with it, an instance does
so once. Entries are evicted least-recently-used beyond a byte budget (sizes as
``dask.sizeof`` estimates them), so a long-lived instance's memory stays bounded. Values
are shared, not copied: like dask's own schedulers, we rely on tasks not mutating their
inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from dask.sizeof import sizeof


class OutputCache:
    """LRU of deserialized outputs keyed by ``(run_id, node index)``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, int], tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def get(self, run_id: str, index: int) -> tuple[bool, Any, int]:
        """``(found, value, size)``: the size is the one ``put`` was given, so a task that
        reads a cached value does not size it again."""
        entry = self._entries.get((run_id, index))
        if entry is None:
            return False, None, 0
        self._entries.move_to_end((run_id, index))
        return True, *entry

    def put(self, run_id: str, index: int, value: Any, size: int | None = None) -> None:
        """Keep ``value``; ``size`` is its ``dask.sizeof`` when the caller knows it."""
        size = int(sizeof(value)) if size is None else size
        if size > self.max_bytes or (run_id, index) in self._entries:
            return
        self._entries[(run_id, index)] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def __len__(self) -> int:
        return len(self._entries)
