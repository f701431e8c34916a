"""Fixtures: real Redis servers for the whole session, and a leak check after every test.

``redis_url`` is a private redis-server on a free port of 127.0.0.1 ("standalone"), and —
for the modules in ``CLUSTER_MODULES``, the core, planner and reliability tests (but the
worker-kill trials) — also a private Redis Cluster of 3 masters and 3 replicas
("cluster", ``tests.redis_cluster``) when the test or a fixture it asks for uses
``redis_url`` (a test with servers of its own runs once).
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
from tests.trials import TrialTally

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
# CPU-share check measures cgroup quotas, which no Redis flavour changes; a chain of
# 20 000 runs in one worker that publishes no output to another slot: on a cluster it
# takes the same paths as on one server, 20 000 times.
STANDALONE_ONLY = frozenset(
    {
        "test_killed_workers_do_not_hang_or_lose_the_result",
        "test_cpu_share_prediction_matches_the_measured_slowdown",
        "test_chain_of_20000",
    }
)


def uses_the_session_redis(metafunc: pytest.Metafunc) -> bool:
    """Whether the test itself, or a fixture it asks for, uses ``redis_url`` (the autouse
    leak check alone does not count: a test with servers of its own needs no cluster)."""
    seen: set[str] = set()
    names = list(metafunc.definition._fixtureinfo.argnames)
    while names:
        name = names.pop()
        if name == "redis_url":
            return True
        if name in seen:
            continue
        seen.add(name)
        for fixture in metafunc._arg2fixturedefs.get(name, ()):
            names.extend(fixture.argnames)
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_url" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    both = (
        module in CLUSTER_MODULES
        and metafunc.function.__name__ not in STANDALONE_ONLY
        and uses_the_session_redis(metafunc)
    )
    kinds = ["standalone", "cluster"] if both else ["standalone"]
    if EXTERNAL_URL:
        kinds.append("external")
    metafunc.parametrize("redis_url", kinds, indirect=True, scope="session")


# The tallies of the seeded fault trials (``tests.trials``), by set, for the summary.
TALLIES = pytest.StashKey[dict[str, TrialTally]]()


@pytest.fixture(scope="session")
def tallies(pytestconfig: pytest.Config) -> dict[str, TrialTally]:
    """Every trial set's tally; the terminal summary prints them."""
    return pytestconfig.stash.setdefault(TALLIES, {})


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    for tally in config.stash.get(TALLIES, {}).values():
        if tally.trials:
            terminalreporter.write_sep("-", tally.title)
            terminalreporter.write_line(tally.table())


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
