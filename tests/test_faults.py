"""Fault injection: killed workers, duplicate deliveries, task errors, a Redis restart,
tampered blobs, protected Redis servers, cancellation and oversized outputs.

Every case ends with the right answer or the expected error, and the autouse fixture
checks that no key of any run is left in Redis.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time

import dask
import pytest
import redis

from dask_serverless import Scheduler, UntrustedBlobError
from dask_serverless.backends.local import LocalBackend
from dask_serverless.client import RedisUnavailableError
from dask_serverless.storage.embedded import EmbeddedRedis
from dask_serverless.storage.serialize import new_secret
from dask_serverless.worker.branch import OutputTooLargeError
from tests.conftest import run_keys
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


def kill_instances_while_running(sched: Scheduler, rng: random.Random, stop: threading.Event):
    """SIGKILL a random live instance every now and then until ``stop`` is set."""
    killed = []
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


@pytest.fixture(scope="module")
def kill_stats():
    return {"trials": 0, "killed": 0, "recovered": 0, "seconds": []}


@pytest.mark.parametrize("trial", range(20))
def test_killed_workers_do_not_hang_or_lose_the_result(fragile, kill_stats, trial):
    rng = random.Random(trial)
    collection, expected = SHAPES[trial % len(SHAPES)]()
    stop = threading.Event()
    killed: list = []
    killer = threading.Thread(
        target=lambda: killed.extend(kill_instances_while_running(fragile, rng, stop))
    )
    recovered_before = fragile.recovered_invocations
    started = time.monotonic()
    killer.start()
    try:
        (result,) = dask.compute(collection, scheduler=fragile)
    finally:
        stop.set()
        killer.join()
    assert result == expected
    recovered = fragile.recovered_invocations - recovered_before
    if recovered:
        assert killed, "work was re-invoked although no worker was killed"
    kill_stats["trials"] += 1
    kill_stats["killed"] += len(killed)
    kill_stats["recovered"] += recovered
    kill_stats["seconds"].append(time.monotonic() - started)


def test_the_kill_trials_killed_and_recovered_workers(kill_stats):
    print(f"\nkill trials: {kill_stats}")
    assert kill_stats["trials"] == 20
    assert kill_stats["killed"] >= 10
    assert kill_stats["recovered"] >= 1


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


def test_tampered_output_blob_fails_the_run(scheduler, redis_client):
    early = dask.delayed(inc)(1)
    slow = dask.delayed(sleep_then)(2, 1.0)
    both = dask.delayed(add_all)(early, slow)
    tampered = []

    def tamper():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not tampered:
            for key in redis_client.scan_iter(match="dsl:*:o:*"):
                value = redis_client.get(key)
                if value:
                    redis_client.set(key, value[:-1] + bytes([value[-1] ^ 1]), keepttl=True)
                    tampered.append(key)
            time.sleep(0.02)

    thread = threading.Thread(target=tamper)
    thread.start()
    with pytest.raises(UntrustedBlobError, match="signature does not match"):
        dask.compute(both, scheduler=scheduler)
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
