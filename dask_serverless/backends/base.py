"""The protocol every backend implements: everything the client asks of a platform."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from dask_serverless.protocol.invocation import Invocation


@runtime_checkable
class Backend(Protocol):
    """A serverless platform: fire-and-forget invocations of the worker.

    ``invoke`` returns as soon as the platform accepted the invocations; the workers report
    through Redis, never through the backend. ``concurrency`` is how many invocations the
    platform runs at once when it is known (None: it scales out, as AWS Lambda does);
    the client sizes root bundles by it and workers weigh the run's load against it.
    ``throttled`` says whether configurations get their CPU share (None: not known),
    recorded next to the run's measurements. ``failure`` is why the platform stopped
    serving invocations, if it did: the waiting client raises it instead of waiting for
    its timeout. ``warm_instances`` is how many booted instances of each configuration
    (MB) a run starting now would find warm (empty when the platform does not say), and
    ``prewarm`` starts instances of the given configurations ahead of the invocations
    that will need them (pre-warming) — the planner models both.

    A worker's invoker that is a complete ``Backend`` also serves nested runs (a task that
    calls ``dask_serverless.get``). A platform with a concurrency limit then offers
    ``seceded()``, a context manager during which the waiting worker's slot does not count
    against the limit (as ``distributed.secede``), so nested runs cannot deadlock.

    ``take_crashes(run_id)`` hands over, once, the invocations of a run
    whose instance the platform saw die, each with the cause (exit code, signal, out of
    memory): the client re-invokes them at once and names the cause when it gives up.
    ``cancel(run_id)`` stops what the platform still runs or queues for a run that
    timed out, was interrupted or failed — as far as the platform can (AWS Lambda cannot
    stop a running invocation; its worker stops before its next task). ``close``
    releases what the backend started.
    """

    @property
    def name(self) -> str: ...

    @property
    def concurrency(self) -> int | None: ...

    @property
    def throttled(self) -> bool | None: ...

    @property
    def failure(self) -> BaseException | None: ...

    def invoke(self, invocations: Sequence[Invocation]) -> None: ...

    def warm_instances(self) -> Mapping[int, int]: ...

    def prewarm(self, counts: Mapping[int, int]) -> None: ...

    def take_crashes(self, run_id: str) -> dict[str, str]: ...

    def cancel(self, run_id: str) -> None: ...

    def close(self) -> None: ...
