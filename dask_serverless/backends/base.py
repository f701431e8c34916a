"""The protocol every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Backend(Protocol):
    """A serverless platform: fire-and-forget invocations of the worker handler.

    ``invoke`` returns as soon as the platform accepted the payloads; the workers report
    through Redis, never through the backend. ``close`` releases what the backend started.
    """

    name: str

    def invoke(self, payloads: Sequence[dict]) -> None: ...

    def close(self) -> None: ...
