"""The run store: every Redis command of the run protocol, one named method per script.

The client and the workers talk to Redis only through a ``RunStore`` (key names in
``protocol.keys``, scripts in ``protocol/scripts``). Every multi-key step is one Lua
script over keys of one hash slot, so it is atomic on a single server and on a cluster
(I-3); every key is written with the run's TTL as the last line of defence (I-4). Per task
a worker sends at most one script call, pipelined; no command here scans the keyspace
(I-6). Connection helpers (``connect``, ``client_for``, ``redact``) live here too: what
talks to Redis, and how, is in one place.

Redis Cluster. ``client_for`` returns redis-py's ``RedisCluster`` when the URL names a
node of a cluster (``INFO cluster`` says ``cluster_enabled:1``, or the setting
``serverless.redis-cluster`` says so), with the same URL options — TLS, AUTH, ACL user —
and a retry policy that rides out a failover while the client refreshes its slot map.
The run's control keys share the run's hash slot, so every script runs as on one server.
Its outputs each have a slot of their own (``protocol.keys``); on a cluster that changes
three things here:

- publishing an output is two commands: the output's SET (its slot), acknowledged, then
  the ``complete`` script (the run's slot). The order is what makes it correct: a child
  is made ready only by the script, after its input is stored. A worker that dies between
  the two leaves a stored output nobody counted; its lease lapses, the client re-invokes
  it, and the re-run overwrites the same key and counts once (I-3). If the script finds
  the run gone, the worker deletes the output it just stored — a run is never revived by
  a late write; only a worker that dies in exactly that gap leaves one output behind, for
  its TTL (I-4's last line of defence).
- inputs are read with one MGET per slot, pipelined to all masters at once;
- deleting a run's keys sends one UNLINK per slot, also pipelined per master.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import dask.config
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import Script
from redis.connection import HIREDIS_AVAILABLE, HiredisRespSerializer, PythonRespSerializer
from redis.retry import Retry

from dask_serverless.constants import LARGE_ARGUMENT_BYTES, REDIS_SOCKET_TIMEOUT_S
from dask_serverless.protocol import scripts
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.keys import RunKeys
from dask_serverless.storage.serialize import SignedParts


class StoreRefusedError(RuntimeError):
    """Redis refused to store a value: it is out of memory (``maxmemory`` with
    ``noeviction``) or the value is above its bulk limit (``proto-max-bulk-len``). Not
    retried: storing it again would fail again."""


# Keys per UNLINK when a run is deleted: one pipelined round trip, no giant command.
_DELETE_CHUNK = 5000

# How a cluster client rides out a failover: a master is declared failed after the
# cluster's node timeout (ElastiCache: 15 s; the test cluster: 1 s) and a replica promoted
# within seconds more. Jittered retries from 50 ms up to 2 s, 12 attempts: ~20 s in all.
_CLUSTER_RETRY = (0.05, 2.0, 12)

# A Redis client: one server, or a cluster through redis-py's cluster client.
Client = redis.Redis | redis.RedisCluster


# Query parameters of a Redis URL that hold a credential (redis-py accepts them all).
_SECRET_PARAMETERS = frozenset({"password", "username", "user", "auth", "ssl_password"})


def redact(url: str) -> str:
    """``url`` without its credentials — in the user part or the query — for messages
    and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user = parts.username or ""
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{user}:***@{host}" if parts.password is not None else f"{user}@{host}"
    query = "&".join(
        f"{name}=***" if name.lower() in _SECRET_PARAMETERS else f"{name}={value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and url.startswith(f"{parts.scheme}://"):
        redacted = redacted.replace(":", "://", 1)  # unix:///path keeps its slashes
    return redacted


def _payloads(invocations: Sequence[Invocation]) -> dict[str, str]:
    return {i.invocation_id: json.dumps(i.to_payload()) for i in invocations}


def _batches(reply: Any, cursor: bytes) -> tuple[bytes, list[bytes]]:
    """The event batches of an XREAD ``reply``, and the cursor after the last of them."""
    batches: list[bytes] = []
    for _stream, entries in reply or ():
        for entry_id, fields in entries:
            cursor = entry_id
            batches.append(fields[b"e"])
    return cursor, batches


class CommandPacker:
    """hiredis packs small commands fastest, but copies a 2 MB output into its buffer;
    redis-py's own packer sends large arguments as they are. Each command takes the one
    that suits it. A blob still in parts (``SignedParts``) is sent part by part, as one
    bulk string: the socket reads array data from where the array keeps it."""

    def __init__(self) -> None:
        self._encode = redis.connection.Encoder("utf-8", "strict", False).encode
        self._small = HiredisRespSerializer() if HIREDIS_AVAILABLE else None
        self._large = PythonRespSerializer(6000, self._encode)

    def pack(self, *args: Any) -> list[bytes | memoryview]:
        if any(isinstance(arg, SignedParts) for arg in args):
            return self._pack_parts(args)
        if self._small is None or any(
            isinstance(arg, (bytes, memoryview)) and len(arg) >= LARGE_ARGUMENT_BYTES
            for arg in args
        ):
            return cast("list[bytes | memoryview]", self._large.pack(*args))
        return cast("list[bytes | memoryview]", self._small.pack(*args))

    def _pack_parts(self, args: tuple[Any, ...]) -> list[bytes | memoryview]:
        """RESP for a command whose arguments include blobs in parts."""
        chunks: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
        for arg in args:
            if isinstance(arg, SignedParts):
                chunks.append(b"$%d\r\n" % arg.nbytes)
                chunks.extend(arg.parts)
                chunks.append(b"\r\n")
            else:
                encoded = self._encode(arg)
                chunks.append(b"$%d\r\n%s\r\n" % (len(encoded), encoded))
        return chunks


def is_cluster_url(url: str) -> bool:
    """Whether the server at ``url`` is a node of a Redis Cluster (``INFO cluster``)."""
    if urlsplit(url).scheme == "unix":
        return False
    probe = redis.Redis.from_url(
        url, socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S
    )
    try:
        return bool(probe.info("cluster").get("cluster_enabled"))
    except redis.exceptions.NoPermissionError:
        raise PermissionError(
            f"the Redis user of {redact(url)} may not run INFO, so whether it is a cluster "
            "is unknown: set serverless.redis-cluster to true or false"
        ) from None
    finally:
        probe.close()


def cluster_mode(url: str, cluster: bool | str | None = None) -> bool:
    """Whether to talk to ``url`` as a cluster: ``cluster`` (True, False or ``"auto"``),
    else the setting ``serverless.redis-cluster``; ``"auto"`` asks the server."""
    if cluster is None:
        cluster = dask.config.get("serverless.redis-cluster", "auto")
    if isinstance(cluster, str):
        choice = cluster.strip().lower()
        if choice in ("true", "yes", "1"):
            return True
        if choice in ("false", "no", "0"):
            return False
        if choice != "auto":
            raise ValueError(
                f"serverless.redis-cluster must be auto, true or false, not {cluster!r}"
            )
        return is_cluster_url(url)
    return bool(cluster)


def client_for(url: str, cluster: bool | str | None = None) -> Client:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    ``cluster``: see ``cluster_mode``; deciding ``"auto"`` costs one ``INFO`` round trip.
    A cluster client learns the slot map from the node it is given and keeps it fresh.
    Every call gives up after ``REDIS_SOCKET_TIMEOUT_S`` (connecting included), so a Redis
    that hangs is an error, never a wait without end.
    """
    timeouts = {
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S,
        # No CLIENT SETINFO on connect: two round trips, and a package-metadata lookup
        # that costs a cold instance more than its first task.
        "driver_info": None,
    }
    if cluster_mode(url, cluster):
        base, cap, attempts = _CLUSTER_RETRY
        return redis.RedisCluster.from_url(
            url,
            health_check_interval=30,
            command_packer=CommandPacker(),
            retry=Retry(ExponentialWithJitterBackoff(base=base, cap=cap), attempts),
            **timeouts,
        )
    return redis.Redis.from_url(
        url, health_check_interval=30, command_packer=CommandPacker(), **timeouts
    )


def connect(url: str, cluster: bool | str | None = None) -> Client:
    """A client for ``url``, checked with PING.

    Raises ``ConnectionError`` naming the URL without its password.
    """
    client: Client | None = None
    try:
        client = client_for(url, cluster)
        client.ping()
    except (
        redis.ConnectionError,
        redis.TimeoutError,
        redis.RedisClusterException,
        OSError,
    ) as error:
        if client is not None:
            client.close()
        message = str(error).replace(url, redact(url))
        raise ConnectionError(f"cannot reach Redis at {redact(url)}: {message}") from None
    return client


# How Redis words its refusal of a write for want of memory (maxmemory, no eviction).
_OUT_OF_MEMORY = "OOM command not allowed"


class ScriptCall:
    """One registered script. Redis 6 reports a write refused inside a script for want of
    memory as a script error; it is raised as the ``OutOfMemoryError`` a plain command
    gets, so that every caller handles running out of memory in one way."""

    def __init__(self, script: Script) -> None:
        self._script = script

    @property
    def sha(self) -> str:
        """The script's SHA1, for an ``EVALSHA`` queued in a pipeline."""
        return str(self._script.sha)

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return self._script(keys=keys, args=args)
        except redis.exceptions.ResponseError as error:
            refusal = out_of_memory_as_such(error)
            if refusal is error:
                raise
            raise refusal from error


def out_of_memory_as_such(error: redis.exceptions.ResponseError) -> Exception:
    """``error``, as ``OutOfMemoryError`` when it is Redis refusing a write for memory."""
    if isinstance(error, redis.exceptions.OutOfMemoryError) or _OUT_OF_MEMORY not in str(error):
        return error
    return redis.exceptions.OutOfMemoryError(str(error))


class Scripts:
    """The Lua scripts, registered once per Redis client (registering hashes the source)."""

    def __init__(self, client: Client) -> None:
        self.by_name: dict[str, ScriptCall] = {
            name: ScriptCall(client.register_script(scripts.source(name))) for name in scripts.NAMES
        }

    def __getitem__(self, name: str) -> ScriptCall:
        return self.by_name[name]


class RunStore:
    """All Redis reads and writes of one run, for the client and the workers alike."""

    def __init__(
        self, client: Client, run_id: str, ttl_s: int, scripts: Scripts | None = None
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, redis.RedisCluster)
        self.run_id = run_id
        self.ttl_s = int(ttl_s)
        self.keys = RunKeys(run_id)
        scripts = scripts or Scripts(client)
        self._begin = scripts["begin"]
        self._renew = scripts["renew"]
        self._release = scripts["release"]
        self._lapsed = scripts["lapsed"]
        self._complete = scripts["complete"]
        self._append_events = scripts["append_events"]
        self._fail = scripts["fail"]
        self._seal = scripts["seal"]
        self._announce = scripts["announce"]
        self._queue = scripts["queue"]

    # -- client side -------------------------------------------------------------------

    def create(
        self,
        record: bytes,
        invocations: Sequence[Invocation] = (),
        literals: dict[int, bytes] | None = None,
    ) -> None:
        """Store the run record, noting the ``invocations`` about to start the run.

        ``literals`` are the signed values of the run's large literals by node, stored
        beside the record in the same transaction.
        """
        keys = self.keys
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(keys.record, record, ex=self.ttl_s, nx=True)
            if invocations:
                pipe.hset(keys.queued, mapping=cast("Any", _payloads(invocations)))
                pipe.expire(keys.queued, self.ttl_s)
            for index, blob in (literals or {}).items():
                pipe.set(keys.literal(index), blob, ex=self.ttl_s)
            created, *_ = pipe.execute()
        if not created:
            raise RuntimeError(f"run {self.run_id} already exists")

    def load(self) -> int:
        """How many invocations of the run are running or queued."""
        return sum(self.running_and_queued())

    def running_and_queued(self) -> tuple[int, int]:
        """Invocations of the run holding a lease, and invocations sent but not begun."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.leases)
            pipe.hlen(self.keys.queued)
            running, queued = pipe.execute()
        return int(running), int(queued)

    def primaries(self) -> frozenset[str]:
        """The masters a cluster client knows now (empty for one server): a change says a
        failover happened, after which acknowledged writes may have been lost."""
        if isinstance(self.client, redis.RedisCluster):
            return frozenset(node.name for node in self.client.get_primaries())
        return frozenset()

    def note_invoked(self, invocations: Sequence[Invocation]) -> bool:
        """Note ``invocations`` as queued before they are sent; False when the run is gone."""
        if not invocations:
            return True
        args: list[Any] = [self.ttl_s]
        for invocation_id, payload in _payloads(invocations).items():
            args += [invocation_id, payload]
        return bool(self._queue(keys=[self.keys.record, self.keys.queued], args=args))

    def queued_invocations(self) -> list[Invocation]:
        """Invocations sent but never begun (a client sends them again when none runs)."""
        payloads = cast("dict[bytes, bytes]", self.client.hgetall(self.keys.queued))
        return [Invocation.from_payload(json.loads(p)) for p in payloads.values()]

    def read_events(self, cursor: bytes, block_ms: int | None) -> tuple[bytes, list[bytes]]:
        """Event batches after ``cursor``, waiting up to ``block_ms`` (None: not) for one."""
        block = None if block_ms is None else max(block_ms, 1)
        reply: Any = self.client.xread({self.keys.events: cursor}, block=block)
        return _batches(reply, cursor)

    def wait_signal(self, timeout_s: float) -> str | None:
        """Sleep until a decisive event or ``timeout_s``: ``"finished"`` (the sink's worker
        announced the result), ``"error"`` (the first error), or None."""
        popped = self.client.blpop([self.keys.signal], timeout=max(timeout_s, 0.001))
        if popped is None:
            return None
        what = popped[1]
        return what.decode() if isinstance(what, bytes) else str(what)

    def take_events_and_result(self, cursor: bytes) -> tuple[bytes, list[bytes], bytes | None]:
        """After ``finished``: the event batches after ``cursor`` and the result, and
        delete what the sink's worker left (result, events, signal), in one round trip."""
        keys = self.keys
        with self.client.pipeline(transaction=False) as pipe:
            pipe.xread({keys.events: cursor})
            pipe.get(keys.result)
            for key in (keys.result, keys.events, keys.signal):
                pipe.unlink(key)  # one key per command: a cluster pipeline takes no more
            reply, blob, *_ = pipe.execute()
        cursor, batches = _batches(reply, cursor)
        return cursor, batches, blob

    def get_result(self) -> bytes | None:
        return cast("bytes | None", self.client.get(self.keys.result))

    def take_result(self) -> bytes | None:
        """Read the result and delete what the sink's worker left: result, events, signal."""
        blob = self.get_result()
        self.delete([self.keys.result, self.keys.events, self.keys.signal])
        return blob

    def get_error(self) -> bytes | None:
        return cast("bytes | None", self.client.get(self.keys.error))

    def phase(self) -> str:
        """``"running"`` (record present), ``"sealed"`` (only the result), or ``"lost"``."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.record)
            pipe.exists(self.keys.result)
            running, sealed = pipe.execute()
        return "running" if running else "sealed" if sealed else "lost"

    def keep_alive(self, keys: Iterable[str]) -> None:
        """Give ``keys`` the run's TTL again (EXPIRE never creates a key that is gone)."""
        keys = list(keys)
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.expire(key, self.ttl_s)
            pipe.execute()

    def purge(self, node_count: int, literals: Iterable[int] = ()) -> None:
        """Delete every key of the run, the record first so that no worker writes again."""
        self.client.delete(self.keys.record)
        self.delete(self.keys.all_keys(node_count, literals))

    # -- worker side -------------------------------------------------------------------

    def begin(
        self, invocation_id: str, tasks: Sequence[int], lease_ms: int, want_record: bool
    ) -> tuple[bool, bytes | None] | None:
        """Claim an invocation and take its lease.

        None if the run is gone, ``(False, None)`` for a duplicate delivery, else
        ``(True, record-or-None)``.
        """
        keys = self.keys
        reply = self._begin(
            keys=[keys.record, keys.invocations, keys.leases, keys.restart, keys.queued],
            args=[
                invocation_id,
                self.ttl_s,
                "send" if want_record else "skip",
                lease_ms,
                json.dumps(list(tasks)),
            ],
        )
        if reply is None:
            return None
        return bool(reply[0]), (reply[1] if len(reply) > 1 else None)

    def renew_lease(self, invocation_id: str, lease_ms: int) -> bool:
        """Extend a running invocation's lease; False when the run is gone."""
        return bool(
            self._renew(keys=[self.keys.record, self.keys.leases], args=[invocation_id, lease_ms])
        )

    def release_lease(self, invocation_id: str) -> None:
        self._release(keys=[self.keys.leases, self.keys.restart], args=[invocation_id])

    def take_lapsed_leases(self, dead: Sequence[str] = ()) -> list[tuple[str, list[int]]]:
        """(invocation, restart point) of every invocation whose worker stopped renewing
        its lease, and of those in ``dead`` (their instance is known to have died)."""
        keys = self.keys
        reply = self._lapsed(keys=[keys.record, keys.leases, keys.restart], args=list(dead))
        return [(reply[i].decode(), json.loads(reply[i + 1])) for i in range(0, len(reply), 2)]

    def fetch_literal(self, index: int) -> bytes | None:
        """The signed value of literal node ``index``, as the client stored it."""
        return cast("bytes | None", self.client.get(self.keys.literal(index)))

    def fetch_outputs(self, indices: Sequence[int]) -> list[bytes | None]:
        """The stored outputs of ``indices`` (None where missing): one MGET, or on a cluster
        one MGET per slot, pipelined to all masters at once."""
        if not indices:
            return []
        names = [self.keys.output(i) for i in indices]
        if isinstance(self.client, redis.RedisCluster):
            return cast("list[bytes | None]", self.client.mget_nonatomic(names))
        return cast("list[bytes | None]", self.client.mget(names))

    def complete(
        self,
        index: int,
        output: bytes | SignedParts | None,
        fan_in: Sequence[tuple[int, int]],
        events: bytes | None,
        invocation_id: str = "",
        last_step: bool = False,
        pending: bool = False,
    ) -> tuple[int, list[int]] | None:
        """Publish node ``index``; returns the run's load and the fan-in children won.

        ``fan_in`` holds ``(child, dependency_count)`` pairs. ``last_step`` says the caller
        has nothing else to run unless it wins a child: its lease is then released.
        ``pending`` says it has other work queued, which only its old restart point leads
        back to. The load is how many invocations of the run are running or queued.
        ``None`` means the run was finished or purged meanwhile and the caller should stop.
        """
        keys = self.keys
        script_keys = [keys.record, keys.events, keys.leases, keys.restart, keys.queued]
        after = "release" if last_step else "keep" if pending else "replace"
        tail: list[Any] = [index, events or b"", invocation_id, after]
        for child, count in fan_in:
            tail += [child, count]
        inboxes = [keys.inbox(child) for child, _ in fan_in]
        size = 0 if output is None else len(output)
        # A blob in parts goes to redis-py as it is (``CommandPacker`` sends its parts); a
        # cluster client's node connections pack commands their own way: it gets it joined.
        value = bytes(output) if self.cluster and output is not None else cast("Any", output)
        with self.refusals(keys.output(index), size):
            if output is None:
                reply = self._complete(
                    keys=script_keys + inboxes, args=[self.ttl_s, "none", b"", *tail]
                )
            elif self.cluster:
                # Two slots: the output first, acknowledged, then the counting (see above).
                self.client.set(keys.output(index), value, ex=self.ttl_s)
                reply = self._complete(
                    keys=script_keys + inboxes, args=[self.ttl_s, "none", b"", *tail]
                )
                if reply is None:
                    self.client.unlink(keys.output(index))
            elif len(output) >= LARGE_ARGUMENT_BYTES:
                reply = self._set_then_complete(
                    keys.output(index),
                    value,
                    [*script_keys, keys.output(index), *inboxes],
                    [self.ttl_s, "preset", b"", *tail],
                )
            else:
                reply = self._complete(
                    keys=[*script_keys, keys.output(index), *inboxes],
                    args=[self.ttl_s, "value", value, *tail],
                )
        if reply is None:
            return None
        load, *won = reply
        return int(load), [fan_in[position - 1][0] for position in won]

    def _set_then_complete(
        self, key: str, output: Any, script_keys: list[str], args: list[Any]
    ) -> Any:
        """A plain SET of a large ``output``, then the ``complete`` script, in one round trip.

        Redis never copies the value into Lua this way. A pipeline, not a MULTI: an error
        inside a MULTI makes redis-py format every argument, 2 MB blobs included. The
        script counts nothing unless the output is there (a refused SET fails the script
        too), and deletes it again if the run is gone meanwhile.
        """
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(key, output, ex=self.ttl_s)
            pipe.evalsha(self._complete.sha, len(script_keys), *script_keys, *args)
            stored, reply = pipe.execute(raise_on_error=False)
        if isinstance(stored, Exception):
            raise stored
        if isinstance(reply, redis.exceptions.NoScriptError):
            return self._complete(keys=script_keys, args=args)
        if isinstance(reply, redis.exceptions.ResponseError):
            raise out_of_memory_as_such(reply)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def append_events(self, events: bytes) -> bool:
        """Append a batch of events; False when the run is gone."""
        keys = self.keys
        return bool(self._append_events(keys=[keys.record, keys.events], args=[self.ttl_s, events]))

    def fail(self, error: bytes, events: bytes, node_count: int | None = None) -> bool:
        """Record the run's first error and wake the client; False when the run is gone.

        Should Redis be too full to take even that, the run's outputs (``node_count``
        nodes; the run is failing anyway) are deleted to make room, and it is tried again.
        """
        keys = self.keys
        script_keys = [keys.record, keys.events, keys.error, keys.signal]
        try:
            reply = self._fail(keys=script_keys, args=[self.ttl_s, error, events])
        except redis.exceptions.OutOfMemoryError:
            if node_count is None:
                raise
            self.delete(keys.output(i) for i in range(node_count))
            reply = self._fail(keys=script_keys, args=[self.ttl_s, error, events])
        return reply is not None

    def get_record(self) -> bytes | None:
        return cast("bytes | None", self.client.get(self.keys.record))

    def seal(self, result: bytes) -> bool:
        """Store the result and delete the record: from now on no worker writes."""
        keys = self.keys
        with self.refusals(keys.result, len(result)):
            return self._seal(keys=[keys.record, keys.result], args=[self.ttl_s, result]) == 1

    @contextlib.contextmanager
    def refusals(self, key: str, size: int) -> Iterator[None]:
        """Turn Redis's refusal to store ``size`` bytes under ``key`` into a
        ``StoreRefusedError`` that says so. Redis answers a value above its bulk limit by
        closing the connection, which looks like a lost connection: for a large value it
        is taken for the refusal it most likely is."""
        try:
            yield
        except redis.exceptions.OutOfMemoryError:
            raise StoreRefusedError(
                f"Redis is out of memory (maxmemory, no eviction) and refused {size} bytes "
                f"for key {key}"
            ) from None
        except redis.ConnectionError:
            if size < LARGE_ARGUMENT_BYTES or not self._answers():
                raise
            raise StoreRefusedError(
                f"Redis closed the connection on receiving {size} bytes for key {key}: above "
                "its bulk limit (proto-max-bulk-len)?"
            ) from None

    def _answers(self) -> bool:
        """Whether Redis answers a PING (it is up: a refused value was the value)."""
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def finish(
        self, result: bytes, events: bytes, node_count: int, literals: Iterable[int] = ()
    ) -> bool:
        """``seal``, ``delete_intermediates`` and ``announce`` in one round trip: the sink's
        worker ends the run. False when the run was gone before the seal.

        One pipeline, in order on one connection: a write that finds the record gone does
        nothing, so nothing can come back between the seal and the deletes. A cluster, or
        a Redis that lost the scripts (restarted), gets the three steps one by one.
        """
        keys = self.keys
        if self.cluster:
            return self._finish_in_steps(result, events, node_count, literals)
        intermediates = keys.intermediates(node_count, literals)
        with (
            self.refusals(keys.result, len(result)),
            self.client.pipeline(transaction=False) as pipe,
        ):
            pipe.evalsha(self._seal.sha, 2, keys.record, keys.result, self.ttl_s, result)
            for start in range(0, len(intermediates), _DELETE_CHUNK):
                pipe.unlink(*intermediates[start : start + _DELETE_CHUNK])
            pipe.evalsha(
                self._announce.sha, 3, keys.result, keys.events, keys.signal, self.ttl_s, events
            )
            sealed, *_ = replies = pipe.execute(raise_on_error=False)
        if isinstance(sealed, redis.exceptions.NoScriptError):
            return self._finish_in_steps(result, events, node_count, literals)
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                raise out_of_memory_as_such(reply)
            if isinstance(reply, Exception):
                raise reply
        return sealed == 1

    def _finish_in_steps(
        self, result: bytes, events: bytes, node_count: int, literals: Iterable[int]
    ) -> bool:
        if not self.seal(result):
            return False
        self.delete_intermediates(node_count, literals)
        self.announce(events)
        return True

    def delete_intermediates(self, node_count: int, literals: Iterable[int] = ()) -> None:
        """After ``seal``: every key but the result and the events the client still reads."""
        self.delete(self.keys.intermediates(node_count, literals))

    def announce(self, events: bytes) -> bool:
        """Append the ``finished`` events and wake the client, unless it purged the run."""
        keys = self.keys
        reply = self._announce(
            keys=[keys.result, keys.events, keys.signal], args=[self.ttl_s, events]
        )
        return reply is not None

    def delete(self, keys: Iterable[str]) -> None:
        """UNLINK ``keys`` in pipelined chunks: one round trip for a whole run (on a cluster,
        redis-py sends one UNLINK per slot, pipelined per master)."""
        keys = list(keys)
        if isinstance(self.client, redis.RedisCluster):
            for start in range(0, len(keys), _DELETE_CHUNK):
                self.client.unlink(*keys[start : start + _DELETE_CHUNK])
            return
        with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(keys), _DELETE_CHUNK):
                pipe.unlink(*keys[start : start + _DELETE_CHUNK])
            pipe.execute()
