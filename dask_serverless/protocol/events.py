"""Event records the workers stream to the client, and how a batch of them is encoded.

Workers batch events (a chain of tiny tasks must not pay a Redis round trip per task for
progress reporting) and append each batch as one stream entry. An event is a short JSON
array:

* ``["done", index, worker_id, start_unix_s, duration_s, *metrics]`` — a task finished;
  ``metrics`` (for the planner's history, see ``planning.history``) are memory MB, cold
  start 0/1, input bytes, output bytes, download s, execution s, downloaded bytes, CPU s
  of the execution, peak memory MB, seconds it waited for a CPU (run delay), and the id
  of the invocation that ran it;
* ``["up", index, upload_s]`` — a task's output was stored (sent in a later batch);
* ``["inv", worker_id, memory_mb, cold, startup_s, invocation_id, start_unix_s]`` — an
  invocation started (``startup_s``: a cold start's boot to ready plus the hand-over);
* ``["retry", index, attempt, error_repr]`` — a task raised and is being retried;
* ``["warn", index, category, message, filename, lineno]`` — a task raised a warning
  (``category`` is ``module:qualname``); sent once per distinct warning and task;
* ``["error", index]`` — a task failed; the signed exception is in the run's error key;
* ``["oom", index, memory_mb]`` — the platform killed the instance running a task for
  exceeding its configuration; the client retries it one size up;
* ``["finished"]`` — the sink ran: the result is stored and intermediates are deleted.

The client folds them into a run's progress (``client.progress``); the planner reads
the metrics of ``done`` and ``inv`` events into history (``planning.history``), in the
order ``DONE_METRICS`` and ``INVOCATION_FIELDS`` name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

DONE = "done"
RETRY = "retry"
ERROR = "error"
FINISHED = "finished"
UPLOAD = "up"
INVOCATION = "inv"
WARNING = "warn"
OUT_OF_MEMORY = "oom"

Event = list


class TaskOutOfMemoryError(MemoryError):
    """A task needed more memory than its configuration: the platform killed its
    instance (an ``oom`` event) at the largest configuration, with no larger one to
    retry at. Raised by the client; any backend may raise it too."""

    def __init__(self, task: str, memory_mb: int) -> None:
        super().__init__(
            f"task {task} ran out of memory: its worker was killed for exceeding the "
            f"{memory_mb} MB of its configuration (give it more with "
            f"dask.annotate(memory=…) or a larger memory_configs entry)"
        )
        self.task = task
        self.memory_mb = memory_mb

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task, self.memory_mb))


# The metrics that follow ``["done", index, worker_id, start_unix_s, duration_s]``.
DONE_METRICS = (
    "memory_mb",
    "cold",
    "input_bytes",
    "output_bytes",
    "download_s",
    "exec_s",
    "downloaded_bytes",
    "cpu_s",
    "peak_mb",
    "wait_s",
    "invocation_id",
)
# The fields of an ``inv`` event after its kind.
INVOCATION_FIELDS = ("worker_id", "memory_mb", "cold", "startup_s", "invocation_id", "start")


def encode(events: Sequence[Event]) -> bytes:
    return json.dumps(events, separators=(",", ":")).encode()


def decode(batch: bytes) -> list[Event]:
    return json.loads(batch)


def done(
    index: int, worker_id: str, start: float, duration: float, metrics: Sequence[Any] = ()
) -> Event:
    return [DONE, index, worker_id, round(start, 6), round(duration, 6), *metrics]


def retry(index: int, attempt: int, error_repr: str) -> Event:
    return [RETRY, index, attempt, error_repr]


def warning(index: int, category: str, message: str, filename: str, lineno: int) -> Event:
    return [WARNING, index, category, message, filename, lineno]


def error(index: int) -> Event:
    return [ERROR, index]


def finished() -> Event:
    return [FINISHED]


def out_of_memory(index: int, memory_mb: int) -> Event:
    return [OUT_OF_MEMORY, index, int(memory_mb)]


def upload(index: int, seconds: float) -> Event:
    return [UPLOAD, index, round(seconds, 6)]


def invocation_started(
    worker_id: str,
    memory_mb: int | None,
    cold: bool,
    startup_s: float,
    invocation_id: str = "",
    start: float = 0.0,
) -> Event:
    return [
        INVOCATION,
        worker_id,
        memory_mb or 0,
        int(cold),
        round(startup_s, 6),
        invocation_id,
        round(start, 6),
    ]
