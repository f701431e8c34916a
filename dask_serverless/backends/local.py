"""A local serverless platform: the embedded default's pool of worker processes.

It behaves like AWS Lambda's asynchronous invocation model, so that what works here works
there:

* ``invoke`` is fire-and-forget: payloads go into the platform's queue and the caller
  returns at once; workers invoke further workers the same way (through a request queue
  that a dispatcher thread in the owning process serves, as Lambda's API would).
* an *instance* is a process that handles one invocation at a time; after one it waits up
  to ``keep_alive`` seconds for the next (a *warm* start) and is then reaped.
* when invocations are queued and no instance is idle, a new instance is started (a *cold*
  start) unless ``concurrency`` instances are already alive; otherwise the invocation waits
  in the queue, as Lambda queues asynchronous invocations beyond its concurrency.
* ``deliveries=2`` delivers every invocation twice, as Lambda's at-least-once delivery may:
  the worker protocol must (and does) give the same result with nothing counted twice.

New instances are forked from a ``multiprocessing`` fork server that has already imported
the worker (and the scientific stack the client has loaded), so even a cold start imports
nothing heavy and a warm one imports nothing at all. As with dask's ``processes``
scheduler, a script that uses the local backend needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dask_serverless.worker import handler

# Modules worth importing once in the fork server when the client already uses them.
_PRELOAD_IF_LOADED = ("numpy", "pandas", "dask.array", "dask.bag", "dask.dataframe")
_RESCALE_INTERVAL_S = 0.1
_FUNCTION_NAME = "dask-serverless-local"


@dataclass(frozen=True)
class InstanceSettings:
    """What a new instance is started with (passed over a pipe: never in argv or env)."""

    redis_url: str
    secret: bytes
    keep_alive_s: float
    invocation_timeout_ms: int
    memory_mb: int


@dataclass
class LocalContext:
    """The subset of Lambda's context object that workers use."""

    function_name: str
    memory_limit_in_mb: int
    aws_request_id: str
    deadline: float
    cold_start: bool

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


class QueueInvoker:
    """A worker's way to invoke more workers: hand the payloads to the dispatcher."""

    def __init__(self, requests: Any) -> None:
        self._requests = requests

    def invoke(self, payloads: Sequence[dict]) -> None:
        if payloads:
            self._requests.put(list(payloads))


def instance_main(
    settings: InstanceSettings, work: Any, requests: Any, idle: Any, taken: Any, booted: Any
) -> None:
    """The life of one instance: serve invocations until idle for ``keep_alive_s``."""
    handler.install(
        handler.WorkerEnvironment(
            settings.redis_url,
            settings.secret,
            QueueInvoker(requests),
            worker_id=f"local:{os.getpid()}",
        )
    )
    with booted.get_lock():
        booted.value += 1
    cold = True
    while True:
        with idle.get_lock():
            idle.value += 1
        try:
            payload = work.get(timeout=settings.keep_alive_s)
        except queue.Empty:
            payload = None
        finally:
            with idle.get_lock():
                idle.value -= 1
        if payload is None:
            return
        with taken.get_lock():
            taken.value += 1
        context = LocalContext(
            function_name=_FUNCTION_NAME,
            memory_limit_in_mb=settings.memory_mb,
            aws_request_id=secrets.token_hex(8),
            deadline=time.monotonic() + settings.invocation_timeout_ms / 1000,
            cold_start=cold,
        )
        cold = False
        try:
            handler.handler(payload, context)
        except Exception:
            # What a platform does with a crashed invocation: log it and keep the instance.
            traceback.print_exc(file=sys.stderr)


class LocalBackend:
    """See the module docstring. Thread-safe; owned by one Scheduler."""

    name = "local"

    def __init__(
        self,
        redis_url: str,
        secret: bytes,
        concurrency: int | None = None,
        keep_alive_s: float = 60.0,
        invocation_timeout_ms: int = 900_000,
        memory_mb: int = 1769,
        deliveries: int = 1,
    ) -> None:
        self.concurrency = int(concurrency or os.cpu_count() or 1)
        self.deliveries = int(deliveries)
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._settings = InstanceSettings(
            redis_url, secret, float(keep_alive_s), int(invocation_timeout_ms), int(memory_mb)
        )
        self._mp = multiprocessing.get_context("forkserver")
        preload = ["dask_serverless.worker.handler"]
        preload += [name for name in _PRELOAD_IF_LOADED if name in sys.modules]
        self._mp.set_forkserver_preload(preload)
        self._work = self._mp.Queue()
        self._requests = self._mp.Queue()
        self._idle = self._mp.Value("i", 0)
        self._taken = self._mp.Value("q", 0)
        self._booted = self._mp.Value("q", 0)
        self._submitted = 0
        self._instances: list[Any] = []
        self.cold_starts = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._dispatcher = threading.Thread(
            target=self._serve_requests, name="dask-serverless-local-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def invoke(self, payloads: Sequence[dict]) -> None:
        if self._closed.is_set():
            raise RuntimeError("the local backend is closed")
        with self._lock:
            self._enqueue(payloads)

    def live_instances(self) -> int:
        with self._lock:
            self._instances = [p for p in self._instances if p.is_alive()]
            return len(self._instances)

    def _serve_requests(self) -> None:
        while not self._closed.is_set():
            try:
                batch = self._requests.get(timeout=_RESCALE_INTERVAL_S)
            except queue.Empty:
                with self._lock:
                    self._scale()
                continue
            except (EOFError, OSError):
                return
            if batch is None:
                return
            with self._lock:
                self._enqueue(batch)

    def _enqueue(self, payloads: Sequence[dict]) -> None:
        """Queue payloads (each ``deliveries`` times, as an at-least-once platform may)."""
        for payload in payloads:
            for _ in range(self.deliveries):
                self._work.put(payload)
        self._submitted += len(payloads) * self.deliveries
        self._scale()

    def _scale(self) -> None:
        """Start instances for queued invocations no idle instance will take (lock held)."""
        if self._closed.is_set():
            return
        backlog = self._submitted - self._taken.value
        if backlog <= self._idle.value:
            return
        self._instances = [p for p in self._instances if p.is_alive()]
        booting = min(self.cold_starts - self._booted.value, len(self._instances))
        wanted = backlog - self._idle.value - booting
        for _ in range(min(wanted, self.concurrency - len(self._instances))):
            process = self._mp.Process(
                target=instance_main,
                args=(
                    self._settings,
                    self._work,
                    self._requests,
                    self._idle,
                    self._taken,
                    self._booted,
                ),
                name="dask-serverless-instance",
                daemon=True,
            )
            process.start()
            self._instances.append(process)
            self.cold_starts += 1

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._requests.put(None)
        self._dispatcher.join(timeout=5)
        with self._lock:
            instances = list(self._instances)
            self._instances.clear()
        for _ in instances:
            self._work.put(None)
        deadline = time.monotonic() + 5
        for process in instances:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in instances:
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (self._work, self._requests):
            channel.cancel_join_thread()
            channel.close()
