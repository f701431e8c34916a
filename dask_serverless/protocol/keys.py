"""Every Redis key name the project uses: the keys of one run, and the history keys.

A run's control keys all start with ``dsl:{<run-id>}:``. The braces are a Redis Cluster
hash tag, so every control key of one run lives in one hash slot and each multi-key step
can be a single atomic Lua script. A run's bulk data — its task outputs — must not sit on
that one slot, or a large run would load a single shard of a cluster: each output has its
own hash tag, ``dsl:{<run-id>:o:<i>}``, derived from the run id and the node, so the
outputs of one run spread over every master while clean-up still names each of them from
the DAG's size alone (no ``KEYS``, no ``SCAN``). No script touches an output key on a
cluster; see ``protocol.store`` for how publishing stays correct across the two slots.

Control keys of one run (``P = dsl:{<run-id>}:``):

============  ========  ============================================================
``P record``  string    signed, compressed run record; its existence means "the run is
                        alive" — every worker write is a script that checks it first,
                        so nothing can be written after the run was finished or purged
``P d:<i>``   hash      fan-in inbox of node ``i``: one field per finished parent, plus
                        ``!`` once a worker has claimed the ready node
``P inv``     hash      invocation ids already started (drops duplicate deliveries)
``P leases``  zset      running invocation id → lease expiry (Redis clock, ms); a worker
                        renews its lease while it works, a lapsed lease means it died
``P restart`` hash      running invocation id → JSON list of the nodes to restart it from
``P queued``  hash      invocations sent but not begun: id → payload; with ``leases`` it
                        is the run's load, which workers weigh against the platform's
                        concurrency, and the client sends again what never started
``P events``  stream    batched events for the client (progress, errors, finished)
``P signal``  list      one entry per decisive event (first error, finished): a client
                        that shows no progress sleeps in BLPOP on it, not on the stream
``P error``   string    signed exception of the first task that failed
``P result``  string    signed values of the requested keys, read once by the client
``P l:<i>``   string    signed value of node ``i``, a literal too large for the record
                        (a persisted chunk), stored by the client with the record
============  ========  ============================================================

Bulk keys of one run: ``dsl:{<run-id>:o:<i>}`` (string), the signed output of node ``i``,
stored only when a consumer lives elsewhere; one hash slot per output.

History keys (``H = dsl:history:v2:``) outlive runs: the planner's samples (see
``protocol.history``) and the run history, the newest runs' reports (``protocol.runs``).
The series of one function share the hash tag of its digest, so history spreads over a
cluster by function.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

HISTORY_PREFIX = "dsl:history:v2:"


def new_run_id() -> str:
    """An unguessable run id (128 random bits): one run cannot name another's keys."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class RunKeys:
    """The key names of one run."""

    run_id: str
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", f"dsl:{{{self.run_id}}}:")

    @property
    def record(self) -> str:
        return self.prefix + "record"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def signal(self) -> str:
        return self.prefix + "signal"

    @property
    def result(self) -> str:
        return self.prefix + "result"

    @property
    def error(self) -> str:
        return self.prefix + "error"

    @property
    def invocations(self) -> str:
        return self.prefix + "inv"

    @property
    def leases(self) -> str:
        return self.prefix + "leases"

    @property
    def restart(self) -> str:
        return self.prefix + "restart"

    @property
    def queued(self) -> str:
        return self.prefix + "queued"

    def output(self, index: int) -> str:
        """Node ``index``'s output, in a hash slot of its own (spread over a cluster)."""
        return f"dsl:{{{self.run_id}:o:{index}}}"

    def inbox(self, index: int) -> str:
        return f"{self.prefix}d:{index}"

    def literal(self, index: int) -> str:
        return f"{self.prefix}l:{index}"

    def all_keys(self, node_count: int, literals: Iterable[int] = ()) -> list[str]:
        """Every key the run may have written except its record: known from the DAG's
        size and its stored literals, so deleting a run never scans the keyspace (I-4,
        I-6)."""
        keys = [self.events, self.result, self.error, self.invocations]
        keys += [self.leases, self.restart, self.signal, self.queued]
        keys += [self.output(i) for i in range(node_count)]
        keys += [self.inbox(i) for i in range(node_count)]
        keys += [self.literal(i) for i in literals]
        return keys

    def fixed(self) -> list[str]:
        """The keys of a run whatever its size, record and result included."""
        keys = [self.record, self.events, self.result, self.error, self.invocations]
        return keys + [self.leases, self.restart, self.signal, self.queued]

    def intermediates(self, node_count: int, literals: Iterable[int] = ()) -> list[str]:
        """What the sink's worker deletes: everything but the result and the events,
        which the client still reads."""
        kept = (self.result, self.events)
        return [k for k in self.all_keys(node_count, literals) if k not in kept]


def function_digest(function: str) -> str:
    """A hash of a function identity, so no user text ever becomes key syntax."""
    return hashlib.sha1(function.encode(), usedforsecurity=False).hexdigest()[:20]


def task_history_key(function: str, memory_mb: int) -> str:
    """``[input_bytes, output_bytes, exec_s, cpu_s, peak_mb, wait_s]`` samples of one
    function at one size; every size of one function in one hash slot."""
    return f"{HISTORY_PREFIX}task:{{{function_digest(function)}}}:{int(memory_mb)}"


def transfer_history_key(memory_mb: int) -> str:
    """``[bytes, seconds]`` samples of output reads and writes at one size."""
    return f"{HISTORY_PREFIX}transfer:{int(memory_mb)}"


def startup_history_key(memory_mb: int) -> str:
    """``[cold 0|1, seconds, setup_s]`` samples of invocation start-ups at one size."""
    return f"{HISTORY_PREFIX}startup:{int(memory_mb)}"


def capacity_history_key() -> str:
    """``[unix time, CPUs]`` samples: the cores a local backend's instances got in a run
    (the machine's other load took the rest)."""
    return f"{HISTORY_PREFIX}capacity"


def out_of_memory_history_key(function: str) -> str:
    """The sizes (MB) one function ran out of memory at."""
    return f"{HISTORY_PREFIX}oom:{{{function_digest(function)}}}"


def residual_history_key(function: str) -> str:
    """Measured / planned busy time of one function's recent tasks (calibration)."""
    return f"{HISTORY_PREFIX}resid:{{{function_digest(function)}}}"


def history_generation_key() -> str:
    """How many appends the planner's samples have had: a client that counted every one
    since it read a series still holds that series as Redis does."""
    return f"{HISTORY_PREFIX}generation"


# The run history (protocol.runs): the newest runs, their summaries and their reports.
# One hash tag for all of them: adding a run is one transaction, also on a Redis Cluster
# (the history is bounded, so one slot holds it).
RUNS_HISTORY_KEY = f"{HISTORY_PREFIX}{{runs}}"
RUN_SUMMARIES_KEY = f"{HISTORY_PREFIX}{{runs}}:summaries"


def run_report_key(run_id: str) -> str:
    """A run's report (zlib-compressed JSON) in the run history."""
    return f"{HISTORY_PREFIX}{{runs}}:run:{run_id}"
