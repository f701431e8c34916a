"""The history store: bounded samples of past runs, read and appended in one round trip each.

History outlives runs (I-4 exempts it) and is shared by every Scheduler on the same
Redis, so the next run learns from the last. It is kept *bounded*: every series is a
Redis list trimmed to the ``samples`` most recent entries, so loading history costs the
same after 10 runs as after 10 000 (I-6) — one pipelined round trip of ``LRANGE`` over a
number of keys that depends on the DAG's distinct functions and the memory sizes, never on
the number of past runs.

Keys (``H = dsl:history:v2:``, named in ``protocol.keys``), every entry a compact JSON array:

==============================  =======================================================
``H task:{<fn-digest>}:<MB>``    ``[input_bytes, output_bytes, exec_s, cpu_s, peak_mb,
                                 wait_s]`` of one function at one memory size
                                 (``fn-digest``: hash of the function identity, so no
                                 user text ever becomes key syntax)
``H oom:{<fn-digest>}``          memory sizes (MB) the function ran out of memory at
``H resid:{<fn-digest>}``        measured / planned busy time of its recent tasks (the
                                 model's calibration on this platform; ``RESIDUALS``
                                 kept)
``H transfer:<MB>``              ``[bytes, seconds]`` of an output read or write
``H startup:<MB>``               ``[cold 0|1, seconds, setup_s]`` of an invocation's
                                 start-up, and from its handler's start to its first
                                 task
``H capacity``                   ``[unix time, CPUs]``: the cores a local backend's
                                 instances got in one run (``CAPACITIES`` kept)
``H generation``                 how many appends the series above have had
==============================  =======================================================

On a Redis Cluster the series of one function share a hash slot (the braces), so history
spreads over the masters by function; the pipelined round trip then goes to every master
at once (redis-py's cluster pipeline writes to all nodes before it reads), so loading
still costs one round trip.

Every key carries a long TTL (``history-ttl``), refreshed on each write, so history of
functions nobody runs any more expires on its own. Nothing here scans the keyspace.

A ``HistoryStore`` keeps the series it has read, parsed, so that a client computing one
small graph after another does not fetch and parse the same samples every time. Every
append also increments ``H generation`` (last, after its lists are written). A load reads
that counter first, in the same round trip as the series it does not hold yet: when it
is the one the store last saw, what it holds is what Redis holds. Its own appends it
applies to what it holds as Redis does (newest first, trimmed) when their increment is
the next one, so its own appends keep the series fresh; an append from any other client
shows as a gap in the counter, and the store reads everything again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from dask_serverless.protocol.keys import (
    capacity_history_key,
    history_generation_key,
    out_of_memory_history_key,
    residual_history_key,
    startup_history_key,
    task_history_key,
    transfer_history_key,
)

# Residuals kept per function: the calibration follows the platform's recent behaviour.
RESIDUALS = 32
# Capacity samples kept: the machine's load changes from minute to minute.
CAPACITIES = 16

Sample = list[float]
# What ``HistoryStore.load`` returns: tasks, transfers, start-ups, out-of-memory sizes,
# residuals, capacity.
Loaded = tuple[
    dict[tuple[str, int], list[Sample]],
    dict[int, list[Sample]],
    dict[int, list[Sample]],
    dict[str, list[int]],
    dict[str, list[float]],
    list[Sample],
]


class HistoryStore:
    """Reads and appends history samples; ``samples`` bounds every series."""

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, samples: int = 256, ttl_s: int = 30 * 86400
    ) -> None:
        if samples < 1:
            raise ValueError(f"history samples must be at least 1, got {samples}")
        self.client = client
        self.samples = int(samples)
        self.ttl_s = int(ttl_s)
        # Parsed series by key (newest sample first), valid at ``_generation``. Computes
        # running at once on one Scheduler share the store: one load or append at a time.
        self._held: dict[str, list[Any]] = {}
        self._generation: int | None = None
        self._lock = threading.Lock()

    def load(self, functions: Iterable[str], memories: Iterable[int]) -> Loaded:
        """Samples of ``functions`` at ``memories``, and transfer, start-up and capacity
        samples.

        One pipelined round trip (two when another client appended since the last one);
        returns ``(tasks, transfers, startups, out_of_memory, residuals, capacity)`` keyed
        by ``(function, MB)``, ``MB`` and function (series without samples are left out);
        ``capacity`` newest first.
        """
        with self._lock:
            return self._load(list(dict.fromkeys(functions)), sorted({int(m) for m in memories}))

    def _load(self, names: list[str], sizes: list[int]) -> Loaded:
        series: list[tuple[str, Any, str]] = [
            ("task", (f, m), task_history_key(f, m)) for f in names for m in sizes
        ]
        series += [("oom", f, out_of_memory_history_key(f)) for f in names]
        series += [("resid", f, residual_history_key(f)) for f in names]
        series += [("transfer", m, transfer_history_key(m)) for m in sizes]
        series += [("startup", m, startup_history_key(m)) for m in sizes]
        series += [("capacity", "", capacity_history_key())]
        keys = [key for _kind, _name, key in series]
        missing = [key for key in keys if key not in self._held]
        generation = self._read(missing)
        if generation != self._generation:
            # Another client appended since: what was held before may be stale. (Read
            # after the counter, every series is at least as new as ``generation``.)
            fresh = set(missing)
            self._held = {key: value for key, value in self._held.items() if key in fresh}
            stale = [key for key in keys if key not in fresh]
            if stale:
                self._read(stale)
        self._generation = generation
        found: dict[str, dict[Any, Any]] = {
            kind: {} for kind in ("task", "transfer", "startup", "oom", "resid", "capacity")
        }
        for kind, name, key in series:
            if self._held[key]:
                found[kind][name] = self._held[key]
        return (
            found["task"],
            found["transfer"],
            found["startup"],
            found["oom"],
            found["resid"],
            found["capacity"].get("", []),
        )

    def _read(self, keys: Sequence[str]) -> int | None:
        """Read and hold ``keys``; one round trip. Returns the generation read first."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(history_generation_key())
            for key in keys:
                pipe.lrange(key, 0, self.samples - 1)
            generation, *replies = pipe.execute()
        for key, entries in zip(keys, replies, strict=True):
            # One parse per series: a JSON array of its samples.
            self._held[key] = json.loads(b"[" + b",".join(entries) + b"]") if entries else []
        return None if generation is None else int(generation)

    def append(
        self,
        tasks: Mapping[tuple[str, int], Sequence[Sample]],
        transfers: Mapping[int, Sequence[Sample]],
        startups: Mapping[int, Sequence[Sample]],
        out_of_memory: Mapping[str, Sequence[int]] | None = None,
        residuals: Mapping[str, Sequence[float]] | None = None,
        capacity: Sample | None = None,
    ) -> None:
        """Add samples (newest last), trimming every series to its bound; one round trip."""
        with self._lock:
            self._append(tasks, transfers, startups, out_of_memory, residuals, capacity)

    def _append(
        self,
        tasks: Mapping[tuple[str, int], Sequence[Sample]],
        transfers: Mapping[int, Sequence[Sample]],
        startups: Mapping[int, Sequence[Sample]],
        out_of_memory: Mapping[str, Sequence[int]] | None,
        residuals: Mapping[str, Sequence[float]] | None,
        capacity: Sample | None,
    ) -> None:
        writes: list[tuple[str, Sequence[Any], int]] = [
            (task_history_key(f, m), s, self.samples) for (f, m), s in tasks.items()
        ]
        writes += [
            (out_of_memory_history_key(f), m, self.samples)
            for f, m in (out_of_memory or {}).items()
        ]
        writes += [(residual_history_key(f), r, RESIDUALS) for f, r in (residuals or {}).items()]
        writes += [(transfer_history_key(m), s, self.samples) for m, s in transfers.items()]
        writes += [(startup_history_key(m), s, self.samples) for m, s in startups.items()]
        if capacity is not None:
            writes.append((capacity_history_key(), [capacity], CAPACITIES))
        pushed: list[tuple[str, list[str], int]] = []
        with self.client.pipeline(transaction=False) as pipe:
            for key, samples, bound in writes:
                if not samples:
                    continue
                entries = [json.dumps(s, separators=(",", ":")) for s in samples[-bound:]]
                pipe.lpush(key, *entries)
                pipe.ltrim(key, 0, bound - 1)
                pipe.expire(key, self.ttl_s)
                pushed.append((key, entries, bound))
            generation_key = history_generation_key()
            pipe.incr(generation_key)
            pipe.expire(generation_key, self.ttl_s)
            generation = int(pipe.execute()[-2])
        if self._generation is None or generation != self._generation + 1:
            self._held.clear()
            self._generation = None
            return
        self._generation = generation
        for key, entries, bound in pushed:
            if key in self._held:
                newest = json.loads("[" + ",".join(reversed(entries)) + "]")
                self._held[key] = (newest + self._held[key])[:bound]
