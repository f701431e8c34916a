"""The invocation payload: what one worker is started with.

A payload is plain JSON — Lambda's asynchronous ``Invoke`` carries it, and so does the
local platform's pipe — and holds no secret and no Redis address (I-5)::

    {"run": "<run id>", "id": "<invocation id>", "tasks": [3, 7], "ttl": 86400,
     "lease": 5000, "done": [1, 2], "memory": 1769, "at": 1764601200.123456}

``done`` (bundle nodes an earlier invocation already completed, when a bundle is handed on
half-way) and ``memory`` (the planned configuration, MB) are optional; ``at`` is when the
payload was sent — or handed to an instance, by a platform that queues it — and ``boot``
how long the instance that takes it booted, when it is a new one, for start-up metrics.
``Invocation`` is its typed form; ``from_payload``
is the one parser, and it refuses a malformed payload with an ``InvalidInvocationError``
that says which field is wrong.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dask_serverless.constants import DEFAULT_LEASE_MS


class InvalidInvocationError(ValueError):
    """A payload that is not a valid invocation; the message names the field."""


@dataclass(frozen=True)
class Invocation:
    """One invocation of a worker: which run, which nodes to start with, on what terms."""

    run_id: str
    invocation_id: str
    tasks: tuple[int, ...]
    ttl_s: int
    lease_ms: int = DEFAULT_LEASE_MS
    done: tuple[int, ...] = ()
    memory_mb: int | None = None
    sent_at: float | None = None
    boot_s: float = 0.0

    @classmethod
    def new(
        cls,
        run_id: str,
        tasks: Sequence[int],
        ttl_s: int,
        lease_ms: int,
        done: Sequence[int] = (),
        memory_mb: int | None = None,
    ) -> Invocation:
        """A fresh invocation (new random id) sent now."""
        return cls(
            run_id,
            secrets.token_hex(8),
            tuple(tasks),
            int(ttl_s),
            int(lease_ms),
            tuple(done),
            int(memory_mb) if memory_mb else None,
            time.time(),
        )

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "run": self.run_id,
            "id": self.invocation_id,
            "tasks": list(self.tasks),
            "ttl": self.ttl_s,
            "lease": self.lease_ms,
        }
        if self.done:
            payload["done"] = list(self.done)
        if self.memory_mb:
            payload["memory"] = self.memory_mb
        if self.sent_at is not None:
            payload["at"] = round(self.sent_at, 6)
        if self.boot_s:
            payload["boot"] = round(self.boot_s, 6)
        return payload

    @classmethod
    def from_payload(cls, payload: Any) -> Invocation:
        """Parse and validate ``payload``; ``InvalidInvocationError`` names what is wrong."""
        if not isinstance(payload, Mapping):
            raise InvalidInvocationError(
                f"an invocation payload must be a JSON object, not {type(payload).__name__}"
            )
        unknown = set(payload) - _FIELDS
        if unknown:
            raise InvalidInvocationError(f"unknown invocation field(s): {sorted(unknown)}")
        lease = payload.get("lease", DEFAULT_LEASE_MS)
        memory = payload.get("memory")
        at = payload.get("at")
        boot = payload.get("boot", 0.0)
        return cls(
            run_id=_text(payload, "run"),
            invocation_id=_text(payload, "id"),
            tasks=_indices(payload, "tasks", required=True),
            ttl_s=_positive(payload.get("ttl"), "ttl"),
            lease_ms=_positive(lease, "lease"),
            done=_indices(payload, "done", required=False),
            memory_mb=None if memory in (None, 0) else _positive(memory, "memory"),
            sent_at=None if at is None else _number(at, "at"),
            boot_s=_number(boot, "boot"),
        )


_FIELDS = frozenset({"run", "id", "tasks", "ttl", "lease", "done", "memory", "at", "boot"})


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidInvocationError(f"invocation field {name!r} must be a non-empty string")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any, name: str) -> int:
    if not _is_int(value) or value <= 0:
        raise InvalidInvocationError(
            f"invocation field {name!r} must be a positive integer, got {value!r}"
        )
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInvocationError(f"invocation field {name!r} must be a number, got {value!r}")
    return float(value)


def _indices(payload: Mapping[str, Any], name: str, required: bool) -> tuple[int, ...]:
    value = payload.get(name)
    if value is None and not required:
        return ()
    if not isinstance(value, list):
        raise InvalidInvocationError(
            f"invocation field {name!r} must be a list of node indices, got {value!r}"
        )
    if not all(_is_int(i) and i >= 0 for i in value):
        raise InvalidInvocationError(
            f"invocation field {name!r} must hold node indices (integers >= 0), got {value!r}"
        )
    return tuple(value)
