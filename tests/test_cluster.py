"""Redis Cluster: detection, one run's outputs over every master, and masters killed mid-run.

These tests use local clusters of 3 masters and 3 replicas (``tests.redis_cluster``): the
session's shared cluster for detection and spread, and a private one for the failover
trials, which kill its masters. Every test checks that no key of its runs is left on any
node of the cluster it used.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Iterator

import dask
import dask.array as da
import numpy as np
import pytest
import redis
from redis.cluster import key_slot
from redis.crc import REDIS_CLUSTER_HASH_SLOTS

from dask_serverless import Scheduler
from dask_serverless.client import RedisUnavailableError, StuckRunError
from dask_serverless.protocol.history import HistoryStore
from dask_serverless.protocol.keys import RunKeys, new_run_id, task_history_key
from dask_serverless.protocol.store import client_for, cluster_mode
from dask_serverless.worker.branch import MissingOutputError
from tests.redis_cluster import LocalRedisCluster
from tests.tasks import add_all, sleep_inc
from tests.trials import RIGHT, Trial, TrialTally

TRIALS = 10
# Seconds a failover trial's run may take at most, and the slack allowed past it.
TRIAL_TIMEOUT_S = 40
TRIAL_SLACK_S = 15
# Errors that say clearly why a run could not finish after a master failed.
CLEAR_ERRORS = (
    RedisUnavailableError,
    StuckRunError,
    MissingOutputError,
    TimeoutError,
    redis.RedisError,
)


def node_run_keys(ports: list[int]) -> dict[int, list[bytes]]:
    """Run keys (not history) on each node, read node by node."""
    found = {}
    for port in ports:
        node = redis.Redis(port=port)
        try:
            found[port] = [
                k for k in node.scan_iter(match="dsl:*", count=1000) if b"dsl:history:" not in k
            ]
        finally:
            node.close()
    return found


def assert_no_run_keys(cluster: LocalRedisCluster) -> None:
    """No run key on any node (replicas get a moment to apply the last deletes)."""
    deadline = time.monotonic() + 3
    while True:
        left = {p: k for p, k in node_run_keys(cluster.live_ports()).items() if k}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"run keys left on nodes: {left}"


def test_a_cluster_is_detected_and_the_setting_overrides(redis_cluster, redis_url):
    assert cluster_mode(redis_cluster.url)
    assert not cluster_mode(redis_url)
    assert cluster_mode(redis_url, "true") and not cluster_mode(redis_cluster.url, False)
    with dask.config.set({"serverless.redis-cluster": "false"}):
        assert not cluster_mode(redis_cluster.url)
    with pytest.raises(ValueError, match="auto, true or false"):
        cluster_mode(redis_url, "sometimes")
    assert isinstance(client_for(redis_cluster.url), redis.RedisCluster)
    assert isinstance(client_for(redis_url), redis.Redis)


def test_control_keys_share_a_slot_and_outputs_spread_over_slots():
    keys = RunKeys(new_run_id())
    control = keys.all_keys(0) + [keys.record] + [keys.inbox(i) for i in range(50)]
    assert len({key_slot(k.encode()) for k in control}) == 1
    # Over a three-master cluster's equal slot ranges, 300 outputs land at least a fifth
    # on each master (CRC16 of near-equal names repeats some slots, so count masters).
    slots = [key_slot(keys.output(i).encode()) for i in range(300)]
    per_master = collections.Counter(slot * 3 // REDIS_CLUSTER_HASH_SLOTS for slot in slots)
    assert len(per_master) == 3 and min(per_master.values()) >= 0.2 * len(slots)
    assert all(keys.output(i) in keys.all_keys(200) for i in range(200))


def test_history_of_one_function_shares_a_slot_and_loads_in_one_pipeline(redis_cluster):
    client = client_for(redis_cluster.url)
    sizes = (512, 1024, 1769, 3008)
    assert len({key_slot(task_history_key("f-x", m).encode()) for m in sizes}) == 1
    functions = [f"cluster-history-{new_run_id()}-{i}" for i in range(30)]
    slots = {key_slot(task_history_key(f, 1024).encode()) for f in functions}
    owners = {str(client.nodes_manager.get_node_from_slot(s).port) for s in slots}
    assert len(owners) == 3
    store = HistoryStore(client, samples=4, ttl_s=60)
    store.append({(f, 1024): [[1.0, 2.0, 0.5]] for f in functions}, {}, {})
    tasks, *_ = store.load(functions, [1024])
    assert tasks == {(f, 1024): [[1.0, 2.0, 0.5]] for f in functions}
    client.close()


def sample_output_bytes(ports: list[int], stop: threading.Event, samples: list) -> None:
    """Bytes of run outputs on each master, sampled until ``stop``."""
    nodes = {port: redis.Redis(port=port) for port in ports}
    try:
        while not stop.is_set():
            sample = {}
            for port, node in nodes.items():
                names = list(node.scan_iter(match="dsl:{*:o:*}", count=1000))
                with node.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.strlen(name)
                    sample[port] = sum(pipe.execute()) if names else 0
            samples.append(sample)
            time.sleep(0.02)
    finally:
        for node in nodes.values():
            node.close()


def test_a_gemm_runs_output_bytes_spread_over_every_master(redis_cluster):
    rng = np.random.default_rng(0)
    a = rng.random((1024, 1024))
    x = da.from_array(a, chunks=256)
    product = x @ x.T + 1
    masters = redis_cluster.masters()
    samples: list[dict[int, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_output_bytes, args=(masters, stop, samples))
    sampler.start()
    try:
        # The blocks are data this process holds: they are kept on the workers, whose
        # outputs are what spreads (placed beside the data, the work would stay here).
        with Scheduler(
            redis=redis_cluster.url, concurrency=4, timeout=120, client_tasks=False
        ) as sched:
            (value,) = dask.compute(product, scheduler=sched)
    finally:
        stop.set()
        sampler.join()
    np.testing.assert_allclose(value, a @ a.T + 1)
    peak = max(samples, key=lambda s: sum(s.values()))
    total = sum(peak.values())
    assert total >= 4 * 256 * 256 * 8, f"no run in progress was seen: {samples[-5:]}"
    shares = {port: size / total for port, size in peak.items()}
    print(f"\noutput bytes at the peak: {total} — share per master: {shares}")
    assert all(share >= 0.20 for share in shares.values()), shares
    assert_no_run_keys(redis_cluster)


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def failover_tally(tallies):
    return tallies.setdefault("failover", TrialTally("Redis Cluster masters killed mid-run"))


def record_master(cluster: LocalRedisCluster) -> int | None:
    """The master that holds a running run's record (its control slot), if any."""
    for port, names in node_run_keys(cluster.masters()).items():
        if any(name.endswith(b":record") for name in names):
            return port
    return None


@pytest.mark.parametrize("trial", range(TRIALS))
def test_killing_a_master_mid_run_ends_right_or_with_a_clear_error(
    failover_cluster, failover_tally, trial
):
    cluster = failover_cluster
    cluster.wait_until_whole()
    url_port = int(cluster.url.rsplit(":", 1)[1])
    rng = random.Random(trial)
    leaves = [dask.delayed(sleep_inc)(i, 0.1) for i in range(120)]
    groups = [dask.delayed(add_all)(*leaves[i : i + 4]) for i in range(0, len(leaves), 4)]
    total = dask.delayed(add_all)(*groups)
    expected = sum(range(1, 121))
    delay = rng.uniform(0.5, 2.0)
    hit_run = rng.random() < 0.5
    killed: list[int] = []

    def kill_a_master() -> None:
        time.sleep(delay)
        # The URL's node stays up: it is how new workers find the cluster (on ElastiCache
        # the configuration endpoint plays this part and outlives any node).
        candidates = [p for p in cluster.masters() if p != url_port]
        target = record_master(cluster) if hit_run else None
        victim = target if target in candidates else rng.choice(candidates)
        cluster.kill(victim)
        killed.append(victim)

    killer = threading.Thread(target=kill_a_master)
    started = time.monotonic()
    with Scheduler(
        redis=cluster.url, concurrency=4, lease_timeout=2, timeout=TRIAL_TIMEOUT_S
    ) as sched:
        killer.start()
        try:
            (value,) = dask.compute(total, scheduler=sched)
            outcome, detail = (RIGHT, "") if value == expected else ("WRONG", str(value))
        except CLEAR_ERRORS as error:
            outcome, detail = type(error).__name__, str(error)[:100]
        finally:
            killer.join()
    elapsed = time.monotonic() - started
    fault = f"{'run' if hit_run else 'any'} master, {delay:.2f} s in"
    failover_tally.add(Trial(trial, fault, outcome, elapsed, f"killed {killed} {detail}"))
    for port in killed:
        cluster.restart(port)
    cluster.wait_until_whole()
    assert outcome != "WRONG", detail
    assert elapsed < TRIAL_TIMEOUT_S + TRIAL_SLACK_S
    assert_no_run_keys(cluster)


def test_the_failover_trials_all_ended(failover_tally):
    print(f"\n{failover_tally.table()}")
    assert len(failover_tally.trials) == TRIALS
    assert "WRONG" not in failover_tally.outcomes()
