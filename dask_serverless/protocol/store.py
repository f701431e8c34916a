"""The Redis key schema, the Lua scripts, and every command the project sends.

Nothing outside this module builds a Redis key. A run's keys all start with
``dsl:{<run-id>}:`` — the braces are a cluster hash tag, so every key of a run lives in one
hash slot and each multi-key step below can be a single atomic Lua script (I-3), while
different runs spread over the shards of a cluster.

Keys of one run (``P = dsl:{<run-id>}:``):

============  ========  ============================================================
``P record``  string    signed, compressed run record; its existence means "the run is
                        alive" — every worker write is a script that checks it first,
                        so nothing can be written after the run was finished or purged
``P o:<i>``   string    signed output of node ``i`` (only when a consumer lives elsewhere)
``P d:<i>``   hash      fan-in inbox of node ``i``: one field per finished parent, plus
                        ``!`` once a worker has claimed the ready node
``P inv``     hash      invocation ids already started (drops duplicate deliveries)
``P leases``  zset      running invocation id → lease expiry (Redis clock, ms); a worker
                        renews its lease while it works, a lapsed lease means it died
``P restart`` hash      running invocation id → JSON list of the nodes to restart it from
``P queued``  string    invocations sent but not begun; with ``leases`` it is the run's
                        load, which workers weigh against the platform's concurrency
``P events``  stream    batched events for the client (progress, errors, finished)
``P signal``  list      one entry per decisive event (first error, finished): a client
                        that shows no progress sleeps in BLPOP on it, not on the stream
``P error``   string    signed exception of the first task that failed
``P result``  string    signed values of the requested keys, read once by the client
============  ========  ============================================================

Every one of them is written with a TTL (``run-ttl``) as the last line of defence (I-4).
Per task, a worker sends at most one script call, pipelined; no command here scans the
keyspace (I-6).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.connection import HIREDIS_AVAILABLE, HiredisRespSerializer, PythonRespSerializer

_DELETE_CHUNK = 5000

# Publish a finished task: store its output, append events, count it once in every fan-in
# child's inbox and claim the children it made ready. The children this caller won are
# only runnable by it now, so they join its lease's restart point — replacing it when
# the caller has nothing else pending (ARGV[7] == '0'), else added to it, as the pending
# work is only reachable from the old point. ARGV[6] == '1' means the caller has nothing
# else to do, so if it won nothing its lease is released. Returns the run's load (running
# plus queued invocations) followed by the 1-based positions of the won children among
# the inboxes, or nil when the run is gone.
# A large output is SET by the caller just before, in the same MULTI (ARGV[2] == '='): the
# script deletes it again if the run is gone, and Redis never copies the bytes into Lua.
# KEYS: record, events, output, leases, restart, queued, inbox…
# ARGV: ttl, output|'='|'', parent, events|'', invocation, release, keep, (child, needed)…
_COMPLETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '=' then redis.call('DEL', KEYS[3]) end
  return false
end
local ttl = ARGV[1]
if ARGV[2] ~= '' and ARGV[2] ~= '=' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ttl) end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ttl)
end
local won, children = {}, {}
for i = 7, #KEYS do
  local inbox = KEYS[i]
  local position = i - 6
  redis.call('HSETNX', inbox, ARGV[3], '1')
  redis.call('EXPIRE', inbox, ttl)
  if redis.call('HLEN', inbox) >= tonumber(ARGV[7 + 2 * position])
      and redis.call('HSETNX', inbox, '!', '1') == 1 then
    won[#won + 1] = position
    children[#children + 1] = tonumber(ARGV[6 + 2 * position])
  end
end
if #won > 0 then
  if ARGV[7] == '1' then
    local old = redis.call('HGET', KEYS[5], ARGV[5])
    if old then
      for _, node in ipairs(cjson.decode(old)) do children[#children + 1] = node end
    end
  end
  redis.call('HSET', KEYS[5], ARGV[5], cjson.encode(children))
elseif ARGV[6] == '1' then
  redis.call('ZREM', KEYS[4], ARGV[5])
  redis.call('HDEL', KEYS[5], ARGV[5])
end
local load = redis.call('ZCARD', KEYS[4]) + tonumber(redis.call('GET', KEYS[6]) or '0')
table.insert(won, 1, load)
return won
"""

# Start an invocation: nil if the run is gone, {0} for a duplicate delivery, else take a
# lease, note where to restart from, and return {1} and, when asked, the run record.
# KEYS: record, inv, leases, restart, queued.
# ARGV: invocation, ttl, want_record, lease_ms, tasks.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('HSETNX', KEYS[2], ARGV[1], '1') == 0 then return {0} end
if redis.call('DECR', KEYS[5]) < 0 then redis.call('SET', KEYS[5], 0) end
redis.call('EXPIRE', KEYS[5], ARGV[2])
local now = redis.call('TIME')
local expiry = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[4])
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
if ARGV[3] == '1' then return {1, redis.call('GET', KEYS[1])} end
return {1}
"""

# Keep a running invocation's lease; 0 tells the worker its run is gone (cancelled).
_RENEW = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = redis.call('TIME')
local expiry = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', expiry, ARGV[1])
return 1
"""

# Hand back a lease: the invocation ended without leaving work only it could do.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# Take every lapsed lease (its worker died) with its restart point, so that exactly one
# watcher re-invokes it. Returns a flat list: id, tasks, id, tasks, …
_LAPSED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local now = redis.call('TIME')
local cutoff = now[1] * 1000 + math.floor(now[2] / 1000)
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
local out = {}
for _, id in ipairs(lapsed) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or '[]'
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
return out
"""

# Record the first error of a run and tell the client.
_FAIL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('SET', KEYS[3], ARGV[2], 'NX', 'EX', ARGV[1])
redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[4], 'error')
redis.call('EXPIRE', KEYS[4], ARGV[1])
return 1
"""

# Store the result and end the run's life in one step: later writes by stragglers and
# duplicates find no record and do nothing.
_SEAL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

# Tell the client the result is ready — unless the client already gave up and purged it.
_ANNOUNCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], 'finished')
redis.call('EXPIRE', KEYS[3], ARGV[1])
return 1
"""


def redact(url: str) -> str:
    """``url`` without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


# Arguments at least this long are sent as they are, not copied into one command buffer.
_LARGE_ARGUMENT = 64 * 1024


class CommandPacker:
    """hiredis packs small commands fastest, but copies a 2 MB output into its buffer;
    redis-py's own packer sends large arguments as they are. Each command takes the one
    that suits it."""

    def __init__(self) -> None:
        self._small = HiredisRespSerializer() if HIREDIS_AVAILABLE else None
        self._large = PythonRespSerializer(
            6000, redis.connection.Encoder("utf-8", "strict", False).encode
        )

    def pack(self, *args: Any) -> list[bytes | memoryview]:
        if self._small is None or any(
            isinstance(arg, (bytes, memoryview)) and len(arg) >= _LARGE_ARGUMENT for arg in args
        ):
            return cast("list[bytes | memoryview]", self._large.pack(*args))
        return cast("list[bytes | memoryview]", self._small.pack(*args))


def client_for(url: str) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``); not yet connected."""
    return redis.Redis.from_url(url, health_check_interval=30, command_packer=CommandPacker())


def connect(url: str) -> redis.Redis:
    """A client for ``url``, checked with PING.

    Raises ``ConnectionError`` naming the URL without its password.
    """
    client = client_for(url)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        client.close()
        raise ConnectionError(f"cannot reach Redis at {redact(url)}: {error}") from None
    return client


def new_run_id() -> str:
    """An unguessable run id: one run cannot name, read or delete another's keys."""
    return secrets.token_hex(16)


class Scripts:
    """The Lua scripts, registered once per Redis client (registering hashes the source)."""

    def __init__(self, client: redis.Redis) -> None:
        self.complete = client.register_script(_COMPLETE)
        self.begin = client.register_script(_BEGIN)
        self.renew = client.register_script(_RENEW)
        self.release = client.register_script(_RELEASE)
        self.lapsed = client.register_script(_LAPSED)
        self.fail = client.register_script(_FAIL)
        self.seal = client.register_script(_SEAL)
        self.announce = client.register_script(_ANNOUNCE)


class RunStore:
    """All Redis reads and writes of one run, for the client and the workers alike."""

    def __init__(
        self, client: redis.Redis, run_id: str, ttl_s: int, scripts: Scripts | None = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.ttl_s = int(ttl_s)
        self.prefix = f"dsl:{{{run_id}}}:"
        self.record_key = self.prefix + "record"
        self.events_key = self.prefix + "events"
        self.signal_key = self.prefix + "signal"
        self.result_key = self.prefix + "result"
        self.error_key = self.prefix + "error"
        self.invocations_key = self.prefix + "inv"
        self.leases_key = self.prefix + "leases"
        self.restart_key = self.prefix + "restart"
        self.queued_key = self.prefix + "queued"
        scripts = scripts or Scripts(client)
        self._complete = scripts.complete
        self._begin = scripts.begin
        self._renew = scripts.renew
        self._release = scripts.release
        self._lapsed = scripts.lapsed
        self._fail = scripts.fail
        self._seal = scripts.seal
        self._announce = scripts.announce

    def output_key(self, index: int) -> str:
        return f"{self.prefix}o:{index}"

    def inbox_key(self, index: int) -> str:
        return f"{self.prefix}d:{index}"

    def run_keys(self, node_count: int) -> list[str]:
        """Every key this run may have written: outputs and inboxes of all its nodes."""
        keys = [self.events_key, self.result_key, self.error_key, self.invocations_key]
        keys += [self.leases_key, self.restart_key, self.signal_key, self.queued_key]
        keys += [self.output_key(i) for i in range(node_count)]
        keys += [self.inbox_key(i) for i in range(node_count)]
        return keys

    # -- client side -------------------------------------------------------------------

    def create(self, record: bytes, invocations: int = 0) -> None:
        """Store the run record, counting the ``invocations`` about to start the run."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.record_key, record, ex=self.ttl_s, nx=True)
            pipe.set(self.queued_key, invocations, ex=self.ttl_s)
            created, _ = pipe.execute()
        if not created:
            raise RuntimeError(f"run {self.run_id} already exists")

    def load(self) -> int:
        """How many invocations of the run are running or queued."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.leases_key)
            pipe.get(self.queued_key)
            running, queued = pipe.execute()
        return int(running) + int(queued or 0)

    def note_invoked(self, count: int) -> None:
        """Count ``count`` invocations about to be sent in the run's load."""
        if count > 0:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.incrby(self.queued_key, count)
                pipe.expire(self.queued_key, self.ttl_s)
                pipe.execute()

    def read_events(self, cursor: bytes, block_ms: int | None) -> tuple[bytes, list[bytes]]:
        """Event batches after ``cursor``, waiting up to ``block_ms`` (None: not) for one."""
        block = None if block_ms is None else max(block_ms, 1)
        reply: Any = self.client.xread({self.events_key: cursor}, block=block)
        batches: list[bytes] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                cursor = entry_id
                batches.append(fields[b"e"])
        return cursor, batches

    def wait_signal(self, timeout_s: float) -> bool:
        """Sleep until a decisive event (first error, finished) or ``timeout_s``."""
        return self.client.blpop([self.signal_key], timeout=max(timeout_s, 0.001)) is not None

    def get_result(self) -> bytes | None:
        return cast("bytes | None", self.client.get(self.result_key))

    def get_error(self) -> bytes | None:
        return cast("bytes | None", self.client.get(self.error_key))

    def phase(self) -> str:
        """``"running"`` (record present), ``"sealed"`` (only the result), or ``"lost"``."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(self.record_key)
            pipe.exists(self.result_key)
            running, sealed = pipe.execute()
        return "running" if running else "sealed" if sealed else "lost"

    def purge(self, node_count: int) -> None:
        """Delete every key of the run, the record first so that no worker writes again."""
        self.client.delete(self.record_key)
        self.delete(self.run_keys(node_count))

    # -- worker side -------------------------------------------------------------------

    def begin(
        self, invocation_id: str, tasks: Sequence[int], lease_ms: int, want_record: bool
    ) -> tuple[bool, bytes | None] | None:
        """Claim an invocation and take its lease.

        None if the run is gone, ``(False, None)`` for a duplicate delivery, else
        ``(True, record-or-None)``.
        """
        reply = self._begin(
            keys=[
                self.record_key,
                self.invocations_key,
                self.leases_key,
                self.restart_key,
                self.queued_key,
            ],
            args=[
                invocation_id,
                self.ttl_s,
                "1" if want_record else "0",
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
            self._renew(keys=[self.record_key, self.leases_key], args=[invocation_id, lease_ms])
        )

    def release_lease(self, invocation_id: str) -> None:
        self._release(keys=[self.leases_key, self.restart_key], args=[invocation_id])

    def take_lapsed_leases(self) -> list[list[int]]:
        """Restart points of invocations whose worker stopped renewing its lease."""
        reply = self._lapsed(keys=[self.record_key, self.leases_key, self.restart_key])
        return [json.loads(reply[i + 1]) for i in range(0, len(reply), 2)]

    def fetch_outputs(self, indices: Sequence[int]) -> list[bytes | None]:
        if not indices:
            return []
        return cast("list[bytes | None]", self.client.mget([self.output_key(i) for i in indices]))

    def complete(
        self,
        index: int,
        output: bytes | None,
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
        keys = [
            self.record_key,
            self.events_key,
            self.output_key(index),
            self.leases_key,
            self.restart_key,
            self.queued_key,
        ]
        keys += [self.inbox_key(child) for child, _ in fan_in]
        args: list[Any] = [
            self.ttl_s,
            output or b"",
            index,
            events or b"",
            invocation_id,
            "1" if last_step else "0",
            "1" if pending else "0",
        ]
        for child, count in fan_in:
            args += [child, count]
        if output is not None and len(output) >= _LARGE_ARGUMENT:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.output_key(index), output, ex=self.ttl_s)
                args[1] = "="
                self._complete(keys=keys, args=args, client=pipe)
                _, reply = pipe.execute()
        else:
            reply = self._complete(keys=keys, args=args)
        if reply is None:
            return None
        load, *won = reply
        return int(load), [fan_in[position - 1][0] for position in won]

    def flush_events(self, events: bytes) -> bool:
        """Append events; False when the run is gone."""
        return self.complete(-1, None, (), events) is not None

    def fail(self, error: bytes, events: bytes) -> bool:
        reply = self._fail(
            keys=[self.record_key, self.events_key, self.error_key, self.signal_key],
            args=[self.ttl_s, error, events],
        )
        return reply is not None

    def seal(self, result: bytes) -> bool:
        return self._seal(keys=[self.record_key, self.result_key], args=[self.ttl_s, result]) == 1

    def announce(self, events: bytes) -> bool:
        reply = self._announce(
            keys=[self.result_key, self.events_key, self.signal_key], args=[self.ttl_s, events]
        )
        return reply is not None

    def delete(self, keys: Iterable[str]) -> None:
        """UNLINK ``keys`` in pipelined chunks: one round trip for a whole run."""
        keys = list(keys)
        with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(keys), _DELETE_CHUNK):
                pipe.unlink(*keys[start : start + _DELETE_CHUNK])
            pipe.execute()
