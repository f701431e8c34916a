"""Unit tests of pure state changes: no Redis server is started for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_leaked_run_keys() -> Iterator[None]:
    """These tests write no key anywhere, so there is nothing to check for leaks."""
    yield
