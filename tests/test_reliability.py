"""One test per fault an operator meets: every failure ends the compute promptly and
names its cause, no blob is accepted out of place, and nothing is left in Redis.

Each test states its bound in leases (``LEASE_S``) or against the compute's timeout, with
room for a machine shared with other work; each checks that no key of the run is left,
at once and again a few seconds later (the autouse fixture checks the session server).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import dask
import pytest
import redis

from dask_serverless import (
    Scheduler,
    StuckRunError,
    UntrustedBlobError,
    WorkerCrashedError,
)
from dask_serverless.client import RedisUnavailableError
from dask_serverless.protocol.store import RunStore, StoreRefusedError
from dask_serverless.storage.embedded import EmbeddedRedis
from dask_serverless.worker.branch import OutputTooLargeError
from dask_serverless.worker.handler import WorkerEnvironment
from tests.conftest import run_keys
from tests.tasks import (
    add_all,
    big_bytes,
    crash,
    hold_the_gil,
    inc,
    open_file,
    raise_base,
    sleep_then,
    total,
    total_len,
)
from tests.trials import Trial, TrialTally

LEASE_S = 1.0
# Slack for a machine shared with other work: cold starts, CPU-burning neighbours.
SLACK_S = 8.0
# How long after a compute returns its keys are checked again.
RECHECK_S = 2.0


def assert_clean(client: redis.Redis, recheck_s: float = RECHECK_S) -> None:
    """No run key now, nor ``recheck_s`` later (nothing recreates one)."""
    assert not run_keys(client)
    time.sleep(recheck_s)
    assert not run_keys(client)


@pytest.fixture
def quick(redis_url):
    """A Scheduler with one-second leases, so lost workers are noticed within seconds."""
    with Scheduler(redis=redis_url, concurrency=2, lease_timeout=LEASE_S, timeout=60) as sched:
        yield sched


@pytest.fixture
def private_redis():
    with EmbeddedRedis(tcp=True) as server:
        yield server


# -- crashing tasks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error"),
    [("exit", SystemExit), ("interrupt", KeyboardInterrupt), ("generator", GeneratorExit)],
)
def test_a_base_exception_is_the_tasks_error(quick, redis_client, kind, error):
    started = time.monotonic()
    with pytest.raises(error) as info:
        dask.compute(dask.delayed(raise_base)(kind), scheduler=quick)
    assert time.monotonic() - started < 3 * LEASE_S + SLACK_S
    assert "raise_base" in "".join(__import__("traceback").format_tb(info.value.__traceback__))
    assert quick.recovered_invocations == 0
    assert_clean(redis_client)


@pytest.mark.parametrize(("how", "cause"), [("exit", "code 1"), ("segfault", "SIGSEGV")])
def test_a_dying_instance_is_a_worker_crashed_error(quick, redis_client, how, cause):
    started = time.monotonic()
    work = dask.delayed(crash)(how, dask_key_name="the-crasher")
    with pytest.raises(WorkerCrashedError, match=f"the-crasher.*3 times.*{cause}") as info:
        dask.compute(dask.delayed(inc)(work), scheduler=quick)
    # three crashes, each seen by the platform at once: well within a few leases
    assert time.monotonic() - started < 3 * LEASE_S + SLACK_S
    assert info.value.key == "the-crasher"
    assert_clean(redis_client)


def test_the_reinvocation_cap_is_configurable(redis_url, redis_client):
    with (
        Scheduler(redis=redis_url, lease_timeout=LEASE_S, max_reinvocations=0, timeout=60) as sched,
        pytest.raises(WorkerCrashedError, match="1 times"),
    ):
        dask.compute(dask.delayed(crash)("exit"), scheduler=sched)
    assert_clean(redis_client)


# -- stuck runs --------------------------------------------------------------------------


def test_a_run_whose_inbox_is_lost_is_stuck_and_says_which_task(quick, redis_client):
    early = dask.delayed(sleep_then)(1, 0.1)
    late = dask.delayed(sleep_then)(2, 2.0)
    both = dask.delayed(add_all)(early, late, dask_key_name="the-sum")
    deleted = []

    def lose_the_inbox():
        deadline = time.monotonic() + 10
        while not deleted and time.monotonic() < deadline:
            for key in redis_client.keys("dsl:*:d:*"):
                redis_client.delete(key)
                deleted.append(key)
            time.sleep(0.01)

    thief = threading.Thread(target=lose_the_inbox)
    thief.start()
    started = time.monotonic()
    with pytest.raises(StuckRunError, match="the-sum.*inbox"):
        dask.compute(both, scheduler=quick)
    thief.join()
    assert deleted
    # the late task (2 s), then two quiet leases and a watch
    assert time.monotonic() - started < 2.0 + 3 * LEASE_S + SLACK_S
    assert_clean(redis_client)


# -- integrity ---------------------------------------------------------------------------


def test_a_result_signed_for_another_run_is_refused(redis_url, redis_client, monkeypatch):
    """A result blob copied into another run's result key fails that run."""
    blobs: list[bytes] = []

    def first_then_replayed(blob: bytes | None) -> bytes | None:
        if blob is not None:
            if blobs:
                return blobs[0]
            blobs.append(blob)
        return blob

    take_with_events, take = RunStore.take_events_and_result, RunStore.take_result

    def replay_with_events(store: RunStore, cursor: bytes) -> tuple:
        cursor, batches, blob = take_with_events(store, cursor)
        return cursor, batches, first_then_replayed(blob)

    with Scheduler(redis=redis_url, timeout=60) as sched:
        dask.compute(dask.delayed(inc)(1), scheduler=sched)
        # A man in the middle on the client: from the next result on, every result the
        # client reads is that one.
        monkeypatch.setattr(RunStore, "take_events_and_result", replay_with_events)
        monkeypatch.setattr(RunStore, "take_result", lambda store: first_then_replayed(take(store)))
        assert dask.compute(dask.delayed(inc)(41), scheduler=sched) == (42,)
        with pytest.raises(UntrustedBlobError, match="run result"):
            dask.compute(dask.delayed(inc)(41), scheduler=sched)
        monkeypatch.undo()
    assert_clean(redis_client)


# -- small fixes -------------------------------------------------------------------------


def test_a_password_in_the_query_never_shows():
    url = "redis://127.0.0.1:1/0?password=hunter2-query&socket_connect_timeout=1"
    with pytest.raises(ConnectionError) as info:
        Scheduler(redis=url)
    assert "hunter2" not in str(info.value)
    assert "password=***" in str(info.value)


def test_returning_an_open_file_is_a_type_error(scheduler, redis_client, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("contents")
    with pytest.raises(TypeError, match="open file"):
        dask.compute(dask.delayed(open_file)(str(path)), scheduler=scheduler)
    assert_clean(redis_client)


# -- cancellation ------------------------------------------------------------------------


def test_a_timed_out_run_stops_its_task_and_the_scheduler_stays_usable(redis_url, redis_client):
    with Scheduler(redis=redis_url, concurrency=1, timeout=60) as sched:
        dask.compute(dask.delayed(inc)(0), scheduler=sched)  # a warm instance
        (busy,) = sched.backend.instance_pids()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            dask.compute(dask.delayed(sleep_then)(1, 30), scheduler=sched, timeout=1)
        assert time.monotonic() - started < 1 + SLACK_S
        ended = time.monotonic() + 2
        while time.monotonic() < ended and _alive(busy):
            time.sleep(0.05)
        assert not _alive(busy), "the timed-out task's instance still runs"
        # with one instance only, the next compute needs the slot the task held
        assert dask.compute(dask.delayed(inc)(1), scheduler=sched, timeout=30) == (2,)
    assert_clean(redis_client)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return waited == 0


# -- Redis faults ------------------------------------------------------------------------


def test_queued_invocations_survive_a_redis_restart(tmp_path):
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    with (
        EmbeddedRedis(tcp=True, extra_args=aof) as server,
        Scheduler(redis=server.url, concurrency=1, lease_timeout=LEASE_S, timeout=60) as sched,
    ):
        dask.compute(dask.delayed(inc)(0), scheduler=sched)
        parts = [dask.delayed(sleep_then)(i, 0.3) for i in range(4)]
        restarter = threading.Timer(0.2, server.restart, kwargs={"down_s": 2.0})
        restarter.start()
        started = time.monotonic()
        assert dask.compute(dask.delayed(total)(parts), scheduler=sched) == (6,)
        restarter.join()
        assert time.monotonic() - started < 2.0 + 4 * 0.3 + 3 * LEASE_S + SLACK_S
        assert_clean(redis.Redis.from_url(server.url))


def test_a_compute_started_while_redis_is_down_is_a_clear_error(private_redis):
    """A compute that starts while Redis restarts fails at once with the package's error,
    naming the server (never a raw client error); the Scheduler works once Redis is back."""
    with Scheduler(redis=private_redis.url, lease_timeout=LEASE_S, timeout=60) as sched:
        dask.compute(dask.delayed(inc)(0), scheduler=sched)
        restarter = threading.Thread(target=private_redis.restart, kwargs={"down_s": 1.5})
        restarter.start()
        time.sleep(0.3)
        try:
            with pytest.raises(
                RedisUnavailableError, match=f"cannot reach Redis at {private_redis.url}"
            ):
                dask.compute(dask.delayed(inc)(1), scheduler=sched, timeout=10)
        finally:
            restarter.join()
        assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)
        assert_clean(redis.Redis.from_url(private_redis.url))


def test_an_instance_booting_while_redis_restarts_waits_for_it(private_redis):
    """A worker instance that boots while Redis is down (a restart) waits for it, as an
    invocation's first call does, instead of failing its boot: a platform whose boots
    fail stops starting instances."""
    restarter = threading.Thread(target=private_redis.restart, kwargs={"down_s": 1.5})
    restarter.start()
    time.sleep(0.3)
    try:
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(private_redis.url).ping()
        environment = WorkerEnvironment(private_redis.url, b"secret", invoker=None)
        assert environment.redis.ping()
        environment.redis.close()
    finally:
        restarter.join()


def test_a_hung_redis_cannot_hold_the_compute_past_its_timeout(private_redis):
    client = redis.Redis.from_url(private_redis.url)
    with Scheduler(redis=private_redis.url, lease_timeout=LEASE_S, timeout=60) as sched:
        dask.compute(dask.delayed(inc)(0), scheduler=sched)
        work = dask.delayed(total)([dask.delayed(sleep_then)(i, 1.0) for i in range(3)])
        pause = threading.Timer(0.3, os.kill, (private_redis.process.pid, signal.SIGSTOP))
        pause.start()
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                dask.compute(work, scheduler=sched, timeout=3)
            returned = time.monotonic() - started
        finally:
            # Redis hung all the while: it resumes only once the compute has returned.
            pause.join()
            os.kill(private_redis.process.pid, signal.SIGCONT)
        # the timeout, plus one call's socket timeout
        assert returned < 3 + 5 + SLACK_S
        # the clean-up Redis refused is retried until it succeeds
        deadline = time.monotonic() + 20
        while run_keys(client) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert_clean(client)
        assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)


@pytest.mark.parametrize(
    ("config", "size", "message"),
    [
        (["--maxmemory", "12mb", "--maxmemory-policy", "noeviction"], 3_000_000, "out of memory"),
        (["--proto-max-bulk-len", "1mb"], 2_000_000, "bulk limit"),
    ],
)
def test_redis_refusing_an_output_names_key_and_size_without_retrying(config, size, message):
    with (
        EmbeddedRedis(tcp=True, extra_args=config) as server,
        Scheduler(redis=server.url, lease_timeout=LEASE_S, timeout=60) as sched,
    ):
        blobs = [dask.delayed(big_bytes)(size + i) for i in range(8)]
        started = time.monotonic()
        with pytest.raises(
            StoreRefusedError, match=f"{message}.*bytes for key dsl:|bytes for key dsl:.*{message}"
        ):
            dask.compute(dask.delayed(total_len)(*blobs), scheduler=sched)
        assert time.monotonic() - started < SLACK_S
        assert sched.recovered_invocations == 0
        assert_clean(redis.Redis.from_url(server.url))


def test_a_result_above_the_output_limit_is_refused(redis_url, redis_client):
    with (
        Scheduler(redis=redis_url, max_output_bytes=10_000, timeout=60) as sched,
        pytest.raises(OutputTooLargeError, match="the result .* over the limit of 10000"),
    ):
        dask.compute(dask.delayed(big_bytes)(50_000, dask_key_name="huge"), scheduler=sched)
    assert_clean(redis_client)


# -- leases outside the interpreter ------------------------------------------------------


def test_a_task_holding_the_gil_keeps_its_lease(quick, redis_client):
    """Four leases with the GIL held: the instance's own heartbeat cannot run, the
    platform renews the lease from outside."""
    started = time.monotonic()
    work = dask.delayed(hold_the_gil)(5, 4 * LEASE_S)
    assert dask.compute(dask.delayed(inc)(work), scheduler=quick) == (6,)
    assert quick.recovered_invocations == 0
    assert time.monotonic() - started < 4 * LEASE_S + SLACK_S
    assert_clean(redis_client)


# -- abandoned runs ----------------------------------------------------------------------

KILLED_CLIENT_TTL = 2


def start_client(url: str, seed: int) -> tuple[subprocess.Popen, list[str]]:
    """A client process computing in a loop; returns it once it is ready, with its
    ``server`` line when it runs an embedded Redis."""
    client = subprocess.Popen(
        [sys.executable, "-m", "tests.abandoned_client", url, str(seed), str(KILLED_CLIENT_TTL)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert client.stdout is not None
    lines = []
    for line in client.stdout:
        lines.append(line.strip())
        if line.startswith("ready"):
            break
    return client, lines


def wait_until(condition, seconds: float) -> float:
    """Seconds until ``condition()`` held; fails after ``seconds``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "timed out"
        time.sleep(0.1)
    return time.monotonic() - started


CLIENT_TRIALS = 20
# The trials run side by side, each lane on a Redis of its own (a trial waits until its
# server holds no run key at all).
CLIENT_LANES = 4


@pytest.fixture(scope="module")
def client_tally(tallies):
    return tallies.setdefault("client", TrialTally("Clients SIGKILLed mid-run"))


@pytest.fixture(scope="module")
def client_lanes() -> Iterator[queue.SimpleQueue]:
    """A queue of private Redis servers, one per lane."""
    lanes: queue.SimpleQueue = queue.SimpleQueue()
    with contextlib.ExitStack() as stack:
        for _ in range(CLIENT_LANES):
            lanes.put(stack.enter_context(EmbeddedRedis(tcp=True)))
        yield lanes


def client_trial(url: str, trial: int) -> tuple[Trial, list[str]]:
    """One seeded trial: a client is killed at a random point of its runs. Returns its
    row of the tally and what went wrong (nothing, when the run keys were gone within
    the client's TTL and some slack, and stayed gone)."""
    redis_client = redis.Redis.from_url(url)
    client, _ = start_client(url, trial)
    after_s = random.Random(trial).uniform(0.3, 1.5)
    time.sleep(after_s)
    client.kill()
    client.wait()
    keys = len(run_keys(redis_client))
    started = time.monotonic()
    bound_s = KILLED_CLIENT_TTL + SLACK_S
    while run_keys(redis_client) and time.monotonic() - started < bound_s:
        time.sleep(0.1)
    seconds = time.monotonic() - started
    left = len(run_keys(redis_client))
    time.sleep(1.0)
    left += len(run_keys(redis_client))
    redis_client.close()
    row = Trial(
        trial,
        f"killed after {after_s:.1f} s",
        "keys gone" if not left else "keys left",
        seconds,
        f"{keys} run keys at the kill, {left} left {seconds:.1f} s later",
        {"keys at the kill": keys, "keys left": left},
    )
    return row, [f"trial {trial}: {left} run keys left"] if left else []


def test_a_killed_clients_keys_are_gone_and_its_workers_stop(client_lanes, client_tally):
    """20 seeded trials, four at a time: a client is killed at a random point of its
    runs; their keys outlive it by its TTL (its workers stop once the record is gone),
    and nothing recreates one. The tally says how many keys each kill left behind and
    how long until none was left."""

    problems = client_tally.run(
        client_lanes, lambda server, seed: client_trial(server.url, seed), CLIENT_TRIALS
    )
    assert not problems
    assert client_tally.outcomes()["keys gone"] == CLIENT_TRIALS
    assert client_tally.total("keys at the kill") > 0


def test_a_killed_clients_embedded_redis_dies_and_its_directory_goes():
    client, lines = start_client("embedded", 0)
    (server,) = [line for line in lines if line.startswith("server")]
    _, pid, directory = server.split()
    assert os.path.isdir(directory)
    time.sleep(0.5)
    client.kill()
    client.wait()
    wait_until(lambda: not os.path.exists(directory) and not _alive(int(pid)), SLACK_S)
