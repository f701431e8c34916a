"""The inline backend: workers run in the client's own process, one invocation at a time.

``Scheduler(backend="inline")`` is to the local pool what dask's ``sync`` scheduler is to
its threaded one (or rq's ``SimpleWorker`` to its forking worker): the same worker, the
same Redis scripts, the same signed record, but no process boundary and no parallelism, so
``pdb`` steps from the client into a task and a profiler sees the whole path of a task.

``invoke`` queues the invocations; the first call drains the queue — it serves each
invocation with ``worker.handler.serve``, and invocations the workers make meanwhile join
the queue — and returns when it is empty. So the client's first ``invoke`` runs the whole
run before the client starts listening; the events are all in the stream by then. A task
that starts a nested run secedes (``seceded``): the nested run's ``invoke`` drains the
queue in turn, inside the task.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Mapping, Sequence

from dask_serverless.protocol.invocation import Invocation
from dask_serverless.worker.handler import WorkerEnvironment, serve


class InlineBackend:
    """See the module docstring. Not thread-safe: one client thread drives it."""

    name = "inline"
    throttled: bool | None = None
    failure: BaseException | None = None

    def __init__(self, redis_url: str, secret: bytes, concurrency: int | None = 1) -> None:
        # The concurrency the workers plan for; invocations still run one at a time.
        self.concurrency = concurrency
        self._environment = WorkerEnvironment(redis_url, secret, self, worker_id="inline:0")
        self._queue: collections.deque[Invocation] = collections.deque()
        self._draining = False

    def invoke(self, invocations: Sequence[Invocation]) -> None:
        self._queue.extend(invocations)
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                serve(self._environment, self._queue.popleft(), None)
        finally:
            self._draining = False

    def warm_instances(self) -> Mapping[int, int]:
        """None: the workers run in this process."""
        return {}

    def prewarm(self, counts: Mapping[int, int]) -> None:
        """Nothing to start: the workers run in this process."""

    @contextlib.contextmanager
    def seceded(self) -> Iterator[None]:
        """A task waits for a nested run: the run's ``invoke`` drains the queue itself."""
        draining, self._draining = self._draining, False
        try:
            yield
        finally:
            self._draining = draining

    def close(self) -> None:
        self._queue.clear()
        self._environment.redis.close()
