"""Fixtures: a real Redis server for the whole session, and a leak check after every test.

The server is a private redis-server on a free port of 127.0.0.1, started here and stopped
at the end. Setting ``DASK_SERVERLESS_TEST_REDIS_URL`` runs every test a second time
against that external server too; then only keys that appeared during a test count as
leaked, so other users of that server are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from dask_serverless import Scheduler
from dask_serverless.storage.embedded import EmbeddedRedis

EXTERNAL_URL = os.environ.get("DASK_SERVERLESS_TEST_REDIS_URL")


@pytest.fixture(scope="session", params=["embedded", "external"] if EXTERNAL_URL else ["embedded"])
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "external":
        assert EXTERNAL_URL is not None
        yield EXTERNAL_URL
        return
    with EmbeddedRedis(tcp=True) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def scheduler(redis_url: str) -> Iterator[Scheduler]:
    with Scheduler(redis=redis_url, timeout=120) as sched:
        yield sched


def run_keys(client: redis.Redis) -> set[bytes]:
    """Every run key on the server (history records are meant to stay)."""
    return {
        k for k in client.scan_iter(match="dsl:*", count=1000) if not k.startswith(b"dsl:history:")
    }


@pytest.fixture(autouse=True)
def no_leaked_run_keys(redis_client: redis.Redis) -> Iterator[None]:
    """After every test — passed, failed, timed out — no key of its runs is left."""
    before = run_keys(redis_client)
    yield
    leaked = run_keys(redis_client) - before
    assert not leaked, f"run keys left behind: {sorted(leaked)[:10]}"
