"""Fixtures: real Redis servers for the whole session, and a leak check after every test.

``redis_url`` is a private redis-server on a free port of 127.0.0.1 ("standalone"), and —
for the modules in ``CLUSTER_MODULES``, the core, planner and reliability tests (but the
worker-kill trials) — also a private Redis Cluster of 3 masters and 3 replicas
("cluster", ``tests.redis_cluster``).
Each server starts once per session, on first use, and stops at the end. The other
modules (translation, backends, AWS Lambda, load) do not depend on how Redis is deployed
and run against standalone only, which keeps the suite's time well within its budget.

Setting ``DASK_SERVERLESS_TEST_REDIS_URL`` runs every test against that external server
too; then only keys that appeared during a test count as leaked, so other users of that
server are never touched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from dask_serverless import Scheduler
from dask_serverless.protocol.store import Client, client_for
from dask_serverless.storage.embedded import EmbeddedRedis
from tests.redis_cluster import LocalRedisCluster

EXTERNAL_URL = os.environ.get("DASK_SERVERLESS_TEST_REDIS_URL")

# Test modules whose every test also runs against the Redis Cluster.
CLUSTER_MODULES = frozenset(
    {
        "test_delayed",
        "test_collections",
        "test_errors",
        "test_protocol",
        "test_planning_runs",
        "test_faults",
    }
)


# Tests of those modules that run against standalone only: the 20 worker-kill trials take
# minutes, and tests/test_cluster.py kills workers and masters on a cluster already; the
# CPU-share check measures cgroup quotas, which no Redis flavour changes.
STANDALONE_ONLY = frozenset(
    {
        "test_killed_workers_do_not_hang_or_lose_the_result",
        "test_the_kill_trials_killed_and_recovered_workers",
        "test_cpu_share_prediction_matches_the_measured_slowdown",
    }
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_url" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    both = module in CLUSTER_MODULES and metafunc.function.__name__ not in STANDALONE_ONLY
    kinds = ["standalone", "cluster"] if both else ["standalone"]
    if EXTERNAL_URL:
        kinds.append("external")
    metafunc.parametrize("redis_url", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def standalone_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tcp=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    if request.param == "external":
        assert EXTERNAL_URL is not None
        return EXTERNAL_URL
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("standalone_redis").url)


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[Client]:
    client = client_for(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def scheduler(redis_url: str) -> Iterator[Scheduler]:
    with Scheduler(redis=redis_url, timeout=120) as sched:
        yield sched


def run_keys(client: Client) -> set[bytes]:
    """Every run key on the server — on a cluster, on every master (history records are
    meant to stay)."""
    return {
        k for k in client.scan_iter(match="dsl:*", count=1000) if not k.startswith(b"dsl:history:")
    }


# Seconds a key may outlive its test: on a cluster a straggling duplicate worker stores
# its output in the output's own slot, finds the run gone and deletes it again (see
# dask_serverless.protocol.store); a check in between would see it for a moment.
LEAK_GRACE_S = 2.0


@pytest.fixture(autouse=True)
def no_leaked_run_keys(redis_client: Client) -> Iterator[None]:
    """After every test — passed, failed, timed out — no key of its runs is left."""
    before = run_keys(redis_client)
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    leaked = run_keys(redis_client) - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = run_keys(redis_client) - before
    assert not leaked, f"run keys left behind: {sorted(leaked)[:10]}"
