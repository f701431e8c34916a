"""Fault injection: killed workers, duplicate deliveries, task errors, a Redis restart,
tampered and moved blobs, protected Redis servers, cancellation, oversized outputs, and
seeded trials that pause or restart Redis at random points.

Every case ends with the right answer or the expected error, and the autouse fixture
checks that no key of any run is left in Redis.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import dask
import pytest
import redis

from dask_serverless import Scheduler, StuckRunError, UntrustedBlobError, WorkerCrashedError
from dask_serverless.backends.local import LocalBackend
from dask_serverless.client import RedisUnavailableError
from dask_serverless.storage.embedded import EmbeddedRedis
from dask_serverless.storage.serialize import new_secret
from dask_serverless.worker.branch import OutputTooLargeError
from tests.conftest import LEAK_GRACE_S, run_keys
from tests.tasks import (
    add_all,
    big_bytes,
    fail,
    fail_first,
    inc,
    log_and_sleep,
    sleep_inc,
    sleep_then,
    total,
)
from tests.trials import RIGHT, Trial, TrialTally

LEASE_S = 1.0


def chain(length: int):
    value = dask.delayed(sleep_inc)(0)
    for _ in range(length - 1):
        value = dask.delayed(sleep_inc)(value)
    return value, length


def tree(leaves: int):
    values = [dask.delayed(sleep_inc)(i) for i in range(leaves)]
    while len(values) > 1:
        values = [dask.delayed(add_all)(*values[i : i + 2]) for i in range(0, len(values), 2)]
    return values[0], sum(range(1, leaves + 1))


def fan_out_fan_in(width: int):
    root = dask.delayed(sleep_inc)(0)
    middle = [dask.delayed(sleep_inc)(root) for _ in range(width)]
    return dask.delayed(total)(middle), 2 * width


def lattice(width: int):
    row = [dask.delayed(sleep_inc)(i) for i in range(width)]
    for _ in range(3):
        row = [dask.delayed(add_all)(row[i], row[(i + 1) % width]) for i in range(width)]
    expected = [i + 1 for i in range(width)]
    for _ in range(3):
        expected = [expected[i] + expected[(i + 1) % width] for i in range(width)]
    return dask.delayed(total)(row), sum(expected)


SHAPES = [lambda: chain(30), lambda: tree(32), lambda: fan_out_fan_in(24), lambda: lattice(8)]


@pytest.fixture(scope="module")
def fragile(redis_url):
    """A Scheduler with short leases, so lost workers are detected within seconds."""
    with Scheduler(redis=redis_url, concurrency=4, lease_timeout=LEASE_S, timeout=90) as sched:
        yield sched


def kill_instances_while_running(
    sched: Scheduler,
    rng: random.Random,
    stop: threading.Event,
    running: Callable[[], bool] = lambda: True,
):
    """SIGKILL a random live instance every now and then until ``stop`` is set, once
    ``running()`` says a worker runs (on a busy machine a run may take a while to begin:
    killing only instances that have nothing to lose would show nothing)."""
    killed = []
    while not running() and not stop.wait(0.02):
        pass
    while not stop.wait(rng.uniform(0.1, 0.4)):
        pids = sched.backend.instance_pids()
        if pids and len(killed) < 2:
            victim = rng.choice(pids)
            try:
                os.kill(victim, signal.SIGKILL)
                killed.append((victim, time.monotonic()))
            except ProcessLookupError:
                pass
    return killed


KILL_TRIALS = 20
SHAPE_NAMES = ["chain of 30", "tree of 32", "fan-out of 24", "lattice of 8"]


@pytest.fixture(scope="module")
def kill_tally(tallies):
    return tallies.setdefault("kill", TrialTally("Workers SIGKILLed mid-run"))


# The trials run side by side, each lane with a Scheduler (and instances) of its own.
KILL_LANES = 2


@pytest.fixture(scope="module")
def fragile_lanes() -> Iterator[queue.SimpleQueue]:
    """A queue of ``(server, scheduler)`` lanes: a Redis of its own (the killer watches
    its leases) and a Scheduler with short leases, like ``fragile``."""
    lanes: queue.SimpleQueue = queue.SimpleQueue()
    with contextlib.ExitStack() as stack:
        for _ in range(KILL_LANES):
            server = stack.enter_context(EmbeddedRedis(tcp=True))
            sched = stack.enter_context(
                Scheduler(redis=server.url, concurrency=4, lease_timeout=LEASE_S, timeout=90)
            )
            lanes.put((server, sched))
        yield lanes


def some_lease_held(client: redis.Redis) -> bool:
    """Whether a worker holds a lease on ``client``'s server (a run is executing)."""
    return any(client.zcard(key) for key in client.scan_iter(match="dsl:*:leases"))


def kill_trial(server: EmbeddedRedis, sched: Scheduler, trial: int) -> tuple[Trial, list[str]]:
    """One seeded trial: workers are SIGKILLed while a graph runs. Returns its row of the
    tally and what went wrong (nothing, when the answer was right, work was re-invoked
    only if a worker was killed, and Redis was left clean)."""
    rng = random.Random(trial)
    collection, expected = SHAPES[trial % len(SHAPES)]()
    stop = threading.Event()
    killed: list = []
    client = redis.Redis.from_url(server.url)
    killer = threading.Thread(
        target=lambda: killed.extend(
            kill_instances_while_running(sched, rng, stop, lambda: some_lease_held(client))
        )
    )
    recovered_before = sched.recovered_invocations
    started = time.monotonic()
    killer.start()
    problems = []
    try:
        (result,) = dask.compute(collection, scheduler=sched)
        outcome, detail = RIGHT, ""
        if result != expected:
            problems.append(f"wrong answer {result!r}, expected {expected!r}")
    except Exception as error:
        outcome, detail = type(error).__name__, first_line(error)
        problems.append(f"{outcome}: {detail}")
    finally:
        stop.set()
        killer.join()
    recovered = sched.recovered_invocations - recovered_before
    if recovered and not killed:
        problems.append("work was re-invoked although no worker was killed")
    deadline = time.monotonic() + LEAK_GRACE_S
    while run_keys(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    if run_keys(client):
        problems.append(f"run keys left: {sorted(run_keys(client))[:5]}")
    client.close()
    row = Trial(
        trial,
        SHAPE_NAMES[trial % len(SHAPES)],
        outcome,
        time.monotonic() - started,
        detail or f"{len(killed)} workers killed, {recovered} invocations re-invoked",
        {"workers killed": len(killed), "re-invoked": recovered},
    )
    return row, [f"trial {trial}: {problem}" for problem in problems]


def test_killed_workers_do_not_hang_or_lose_the_result(fragile_lanes, kill_tally):
    """20 seeded trials, two at a time: every answer is right though workers are killed;
    the tally says how many were killed and re-invoked, and how long each trial took."""

    problems = kill_tally.run(
        fragile_lanes, lambda lane, seed: kill_trial(*lane, seed), KILL_TRIALS
    )
    assert not problems
    assert kill_tally.outcomes()[RIGHT] == KILL_TRIALS
    assert kill_tally.total("workers killed") >= 10
    assert kill_tally.total("re-invoked") >= 1


def test_lost_worker_is_detected_within_the_lease(fragile):
    """A worker killed in a long task: its branch is re-run after about one lease."""
    marker = dask.delayed(sleep_then)(7, 1.5)
    started = time.monotonic()
    stop = threading.Event()

    def kill_once():
        time.sleep(0.5)
        for pid in fragile.backend.instance_pids():
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once)
    killer.start()
    assert dask.compute(dask.delayed(inc)(marker), scheduler=fragile) == (8,)
    killer.join()
    stop.set()
    elapsed = time.monotonic() - started
    # killed at 0.5 s, lease lapses within LEASE_S, the watcher looks every LEASE_S / 2,
    # then the 1.5 s task runs again: generous bound for a noisy shared machine
    assert elapsed < 0.5 + LEASE_S * 1.5 + 1.5 + 10


def test_every_invocation_delivered_twice(redis_url):
    secret = new_secret()
    backend = LocalBackend(redis_url, secret, concurrency=3, deliveries=2)
    with Scheduler(redis=redis_url, backend=backend, secret=secret, timeout=90) as sched:
        for make in SHAPES:
            collection, expected = make()
            assert dask.compute(collection, scheduler=sched) == (expected,)


def test_retries_recover_a_flaky_task(scheduler, tmp_path):
    counter = str(tmp_path / "calls")
    flaky = dask.delayed(fail_first)(5, counter, 2)
    with pytest.raises(ConnectionResetError, match="flaky call 1"):
        dask.compute(dask.delayed(inc)(flaky), scheduler=scheduler)
    os.remove(counter)
    with dask.annotate(retries=2):
        flaky = dask.delayed(fail_first)(5, counter, 2)
    assert dask.compute(dask.delayed(inc)(flaky), scheduler=scheduler) == (6,)
    assert list(scheduler.last_retries.values()) == [2]


def test_scheduler_wide_retries_and_exhaustion(redis_url, tmp_path):
    counter = str(tmp_path / "calls")
    with Scheduler(redis=redis_url, retries=1, retry_backoff=0.01, timeout=60) as sched:
        assert dask.compute(dask.delayed(fail_first)(3, counter, 1), scheduler=sched) == (3,)
        with pytest.raises(ValueError, match="task failed on 4"):
            dask.compute(dask.delayed(fail)(4), scheduler=sched)
        assert list(sched.last_retries.values()) == [1]


def test_redis_restart_mid_run_is_a_clear_error(tmp_path):
    with (
        EmbeddedRedis(tcp=True) as server,
        Scheduler(redis=server.url, lease_timeout=LEASE_S, timeout=60) as sched,
    ):
        slow = [dask.delayed(sleep_then)(i, 2.0) for i in range(2)]
        restarter = threading.Timer(0.7, server.restart)
        restarter.start()
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError, match="restarted|connection"):
            dask.compute(dask.delayed(total)(slow), scheduler=sched)
        restarter.join()
        assert time.monotonic() - started < 30
        # the Scheduler reconnects and works again after the restart
        assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)
        assert not run_keys(redis.Redis.from_url(server.url))


@pytest.mark.parametrize("how", ["flipped", "swapped"])
def test_tampered_or_moved_output_blob_fails_the_run(redis_url, redis_client, how):
    """Two outputs, stored by parents that run side by side in two instances, are
    tampered with while a third parent runs: one bit flipped, or the two validly signed
    blobs swapped between their keys. The consumer reads them from Redis (no instance
    holds both) and refuses them, naming the key."""
    with Scheduler(redis=redis_url, concurrency=3, timeout=60) as sched:
        first = dask.delayed(sleep_then)(10, 0.2, dask_key_name="first")
        second = dask.delayed(sleep_then)(20, 0.2, dask_key_name="second")
        slow = dask.delayed(sleep_then)(0, 2.0, dask_key_name="slow")
        work = dask.delayed(add_all)(first, second, slow)
        tampered = []

        def tamper():
            # Generous: on a busy machine the instances may take seconds to boot.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not tampered:
                outputs = sorted(redis_client.scan_iter(match="dsl:*:o:*"))
                if len(outputs) == 2:
                    # one GET each: on a cluster the outputs live in different slots
                    a, b = (redis_client.get(key) for key in outputs)
                    if how == "flipped":
                        b = a[:-1] + bytes([a[-1] ^ 1])
                        outputs = outputs[:1]
                    redis_client.set(outputs[0], b, keepttl=True)
                    if how == "swapped":
                        redis_client.set(outputs[1], a, keepttl=True)
                    tampered.extend(outputs)
                time.sleep(0.01)

        thread = threading.Thread(target=tamper)
        thread.start()
        with pytest.raises(
            UntrustedBlobError,
            match=r"output of '(first|second)' \(key dsl:\{\w+:o:\d+\}\).*signature does not",
        ):
            dask.compute(work, scheduler=sched)
        thread.join()
        assert tampered


def test_password_protected_redis():
    with EmbeddedRedis(tcp=True, password="s3cret-pass") as server:
        with Scheduler(redis=server.url, timeout=60) as sched:
            assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)
            assert not run_keys(redis.Redis.from_url(server.url))
        with pytest.raises(ConnectionError) as info:
            Scheduler(redis=server.url.replace("s3cret-pass", "wrong-pass"))
        assert "wrong-pass" not in str(info.value)
        assert "invalid username-password" in str(info.value)


def test_acl_user_limited_to_dsl_keys():
    with (
        EmbeddedRedis(tcp=True, username="dsl", password="pw-123", key_pattern="dsl:*") as server,
        Scheduler(redis=server.url, timeout=60) as sched,
    ):
        work = dask.delayed(total)([dask.delayed(inc)(i) for i in range(10)])
        assert dask.compute(work, scheduler=sched) == (55,)
        assert not run_keys(redis.Redis.from_url(server.url))


@pytest.fixture
def tls_files(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out",
         cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def tls_server(cert: str, key: str) -> EmbeddedRedis:
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and os.path.exists(candidate):
            try:
                return EmbeddedRedis(server=candidate, tls_cert=cert, tls_key=key)
            except RuntimeError:
                continue
    pytest.skip("no redis-server with TLS support on this machine")


def test_tls_redis(tls_files):
    with tls_server(*tls_files) as server:
        assert server.url.startswith("rediss://")
        with Scheduler(redis=server.url, timeout=60) as sched:
            assert dask.compute(dask.delayed(inc)(dask.delayed(inc)(1)), scheduler=sched) == (3,)
            assert not run_keys(redis.Redis.from_url(server.url))


def tasks_logged(path: str) -> int:
    with open(path) as log:
        return len(log.read().split())


def test_keyboard_interrupt_cancels_the_run(scheduler, tmp_path):
    log = str(tmp_path / "ran")
    value = dask.delayed(log_and_sleep)(0, log, 0.2)
    for _i in range(1, 30):
        value = dask.delayed(log_and_sleep)(value, log, 0.2)

    class InterruptAfterTwoTasks(dask.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            self.seen += 1
            if self.seen == 2:
                raise KeyboardInterrupt

    with InterruptAfterTwoTasks(), pytest.raises(KeyboardInterrupt):
        dask.compute(value, scheduler=scheduler)
    time.sleep(1.0)
    ran = tasks_logged(log)
    time.sleep(1.0)
    assert tasks_logged(log) == ran < 30


def test_output_over_the_limit_names_key_and_limit(redis_url):
    with Scheduler(redis=redis_url, max_output_bytes=10_000, timeout=60) as sched:
        blob = dask.delayed(big_bytes)(50_000, dask_key_name="the-big-one")
        consumers = [dask.delayed(len)(blob), dask.delayed(bytes.upper)(blob)]
        with pytest.raises(OutputTooLargeError, match="the-big-one.*limit of 10000 bytes"):
            dask.compute(consumers, scheduler=sched)


# The trials run side by side, each lane on a Redis of its own (they pause and restart it).
REDIS_LANES = 2


@pytest.fixture(scope="module")
def flaky_redis_lanes() -> Iterator[queue.SimpleQueue]:
    """Redis servers that persist every write (AOF), to pause and restart under a
    Scheduler each: a queue of ``(server, scheduler)`` lanes."""
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    lanes: queue.SimpleQueue = queue.SimpleQueue()
    with contextlib.ExitStack() as stack:
        for _ in range(REDIS_LANES):
            server = stack.enter_context(EmbeddedRedis(tcp=True, extra_args=aof))
            sched = stack.enter_context(
                Scheduler(redis=server.url, concurrency=2, lease_timeout=LEASE_S, timeout=60)
            )
            lanes.put((server, sched))
        yield lanes


def disturb_redis(server: EmbeddedRedis, rng: random.Random) -> str:
    """Pause Redis (SIGSTOP … SIGCONT) or restart it from its AOF, for a random while."""
    time.sleep(rng.uniform(0.1, 1.0))
    if rng.random() < 0.5:
        pause = rng.uniform(0.3, 3.0)
        os.kill(server.process.pid, signal.SIGSTOP)
        time.sleep(pause)
        os.kill(server.process.pid, signal.SIGCONT)
        return f"paused {pause:.1f} s"
    down = rng.uniform(0.2, 2.0)
    server.restart(down_s=down)
    return f"restarted after {down:.1f} s"


REDIS_TRIALS = 20
# What a disturbed compute may raise: each says why the run could not finish.
CLEAR_ERRORS = (TimeoutError, RedisUnavailableError, StuckRunError, WorkerCrashedError)


@pytest.fixture(scope="module")
def redis_tally(tallies):
    return tallies.setdefault("redis", TrialTally("Redis paused (SIGSTOP) or restarted (AOF)"))


def redis_trial(server: EmbeddedRedis, sched: Scheduler, trial: int) -> tuple[Trial, list[str]]:
    """One seeded trial: Redis is paused or restarted under a compute. Returns its row of
    the tally, and what went wrong (nothing, when the compute gave the right answer or
    failed with a clear error within its timeout plus 10 s, and Redis was left clean)."""
    rng = random.Random(1000 + trial)
    collection, expected = [lambda: chain(10), lambda: tree(8), lambda: fan_out_fan_in(8)][
        trial % 3
    ]()
    timeout = 10
    what: list[str] = []
    problems: list[str] = []
    disturber = threading.Thread(target=lambda: what.append(disturb_redis(server, rng)))
    started = time.monotonic()
    disturber.start()
    try:
        (result,) = dask.compute(collection, scheduler=sched, timeout=timeout)
        outcome, detail = RIGHT, ""
        if result != expected:
            problems.append(f"wrong answer {result!r}, expected {expected!r}")
    except CLEAR_ERRORS as error:
        outcome, detail = type(error).__name__, first_line(error)
    except Exception as error:
        outcome, detail = type(error).__name__, first_line(error)
        problems.append(f"unexpected {outcome}: {detail}")
    finally:
        elapsed = time.monotonic() - started
        disturber.join()
    fault = what[0] if what else "?"
    if elapsed >= timeout + 10:
        problems.append(f"took {elapsed:.1f} s")
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 30
    while run_keys(client) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = len(run_keys(client))
    time.sleep(1.0)
    left += len(run_keys(client))
    client.close()
    if left:
        problems.append(f"{left} run keys left")
    row = Trial(trial, fault, outcome, elapsed, detail, {"keys left": left})
    return row, [f"trial {trial} ({fault}): {problem}" for problem in problems]


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0]


def test_a_paused_or_restarted_redis_ends_every_compute_in_time(flaky_redis_lanes, redis_tally):
    """20 seeded trials, two at a time: every compute gives the right answer, or fails
    within its timeout plus 10 s with an error that says why; Redis is clean afterwards.
    The tally says how many gave the right answer, which errors the others raised, and
    how long each took."""

    problems = redis_tally.run(
        flaky_redis_lanes, lambda lane, seed: redis_trial(*lane, seed), REDIS_TRIALS
    )
    assert not problems, problems
    assert len(redis_tally.trials) == REDIS_TRIALS
    assert redis_tally.outcomes()[RIGHT] >= 1
