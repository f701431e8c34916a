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
``P events``  stream    batched events for the client (progress, errors, finished)
``P error``   string    signed exception of the first task that failed
``P result``  string    signed values of the requested keys, read once by the client
============  ========  ============================================================

Every one of them is written with a TTL (``run-ttl``) as the last line of defence (I-4).
Per task, a worker sends at most one script call, pipelined; no command here scans the
keyspace (I-6).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis

_DELETE_CHUNK = 5000

# Publish a finished task: store its output, append events, count it once in every fan-in
# child's inbox and claim the children it made ready. Returns the 1-based positions (among
# the inboxes) of the children this caller won, or nil when the run is gone.
_COMPLETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ttl = ARGV[1]
if ARGV[2] ~= '' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ttl) end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ttl)
end
local won = {}
for i = 4, #KEYS do
  local inbox = KEYS[i]
  redis.call('HSETNX', inbox, ARGV[3], '1')
  redis.call('EXPIRE', inbox, ttl)
  if redis.call('HLEN', inbox) >= tonumber(ARGV[i + 1])
      and redis.call('HSETNX', inbox, '!', '1') == 1 then
    won[#won + 1] = i - 3
  end
end
return won
"""

# Start an invocation: nil if the run is gone, {0} for a duplicate delivery, else {1} and,
# when asked, the run record.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('HSETNX', KEYS[2], ARGV[1], '1') == 0 then return {0} end
redis.call('EXPIRE', KEYS[2], ARGV[2])
if ARGV[3] == '1' then return {1, redis.call('GET', KEYS[1])} end
return {1}
"""

# Record the first error of a run and tell the client.
_FAIL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('SET', KEYS[3], ARGV[2], 'NX', 'EX', ARGV[1])
redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
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


def connect(url: str) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``), checked with PING.

    Raises ``ConnectionError`` naming the URL without its password.
    """
    client = redis.Redis.from_url(url, health_check_interval=30)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        client.close()
        raise ConnectionError(f"cannot reach Redis at {redact(url)}: {error}") from None
    return client


def new_run_id() -> str:
    """An unguessable run id: one run cannot name, read or delete another's keys."""
    return secrets.token_hex(16)


class RunStore:
    """All Redis reads and writes of one run, for the client and the workers alike."""

    def __init__(self, client: redis.Redis, run_id: str, ttl_s: int) -> None:
        self.client = client
        self.run_id = run_id
        self.ttl_s = int(ttl_s)
        self.prefix = f"dsl:{{{run_id}}}:"
        self.record_key = self.prefix + "record"
        self.events_key = self.prefix + "events"
        self.result_key = self.prefix + "result"
        self.error_key = self.prefix + "error"
        self.invocations_key = self.prefix + "inv"
        self._complete = client.register_script(_COMPLETE)
        self._begin = client.register_script(_BEGIN)
        self._fail = client.register_script(_FAIL)
        self._seal = client.register_script(_SEAL)
        self._announce = client.register_script(_ANNOUNCE)

    def output_key(self, index: int) -> str:
        return f"{self.prefix}o:{index}"

    def inbox_key(self, index: int) -> str:
        return f"{self.prefix}d:{index}"

    def run_keys(self, node_count: int) -> list[str]:
        """Every key this run may have written: outputs and inboxes of all its nodes."""
        keys = [self.events_key, self.result_key, self.error_key, self.invocations_key]
        keys += [self.output_key(i) for i in range(node_count)]
        keys += [self.inbox_key(i) for i in range(node_count)]
        return keys

    # -- client side -------------------------------------------------------------------

    def create(self, record: bytes) -> None:
        if not self.client.set(self.record_key, record, ex=self.ttl_s, nx=True):
            raise RuntimeError(f"run {self.run_id} already exists")

    def read_events(self, cursor: bytes, block_ms: int) -> tuple[bytes, list[bytes]]:
        """Event batches after ``cursor``, waiting up to ``block_ms`` for the first."""
        reply: Any = self.client.xread({self.events_key: cursor}, block=max(block_ms, 1))
        batches: list[bytes] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                cursor = entry_id
                batches.append(fields[b"e"])
        return cursor, batches

    def get_result(self) -> bytes | None:
        return cast("bytes | None", self.client.get(self.result_key))

    def get_error(self) -> bytes | None:
        return cast("bytes | None", self.client.get(self.error_key))

    def purge(self, node_count: int) -> None:
        """Delete every key of the run, the record first so that no worker writes again."""
        self.client.delete(self.record_key)
        self.delete(self.run_keys(node_count))

    # -- worker side -------------------------------------------------------------------

    def begin(self, invocation_id: str, want_record: bool) -> tuple[bool, bytes | None] | None:
        """Claim an invocation: None if the run is gone, (False, None) for a duplicate."""
        reply = self._begin(
            keys=[self.record_key, self.invocations_key],
            args=[invocation_id, self.ttl_s, "1" if want_record else "0"],
        )
        if reply is None:
            return None
        return bool(reply[0]), (reply[1] if len(reply) > 1 else None)

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
    ) -> list[int] | None:
        """Publish node ``index``; returns the fan-in children this caller claimed.

        ``fan_in`` holds ``(child, dependency_count)`` pairs. ``None`` means the run was
        finished or purged meanwhile and the caller should stop.
        """
        keys = [self.record_key, self.events_key, self.output_key(index)]
        keys += [self.inbox_key(child) for child, _ in fan_in]
        args: list[Any] = [self.ttl_s, output or b"", index, events or b""]
        args += [count for _, count in fan_in]
        won = self._complete(keys=keys, args=args)
        if won is None:
            return None
        return [fan_in[position - 1][0] for position in won]

    def flush_events(self, events: bytes) -> bool:
        """Append events; False when the run is gone."""
        return self.complete(-1, None, (), events) is not None

    def fail(self, error: bytes, events: bytes) -> bool:
        reply = self._fail(
            keys=[self.record_key, self.events_key, self.error_key],
            args=[self.ttl_s, error, events],
        )
        return reply is not None

    def seal(self, result: bytes) -> bool:
        return self._seal(keys=[self.record_key, self.result_key], args=[self.ttl_s, result]) == 1

    def announce(self, events: bytes) -> bool:
        reply = self._announce(keys=[self.result_key, self.events_key], args=[self.ttl_s, events])
        return reply is not None

    def delete(self, keys: Iterable[str]) -> None:
        """UNLINK ``keys`` in pipelined chunks: one round trip for a whole run."""
        keys = list(keys)
        with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(keys), _DELETE_CHUNK):
                pipe.unlink(*keys[start : start + _DELETE_CHUNK])
            pipe.execute()
