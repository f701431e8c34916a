"""The Redis protocol's guarantees: idempotent fan-in, one claimer, signed blobs, TTLs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import pytest

from dask_serverless import Scheduler, UntrustedBlobError
from dask_serverless.backends.local import LocalBackend
from dask_serverless.protocol.keys import new_run_id
from dask_serverless.protocol.store import RunStore, redact
from dask_serverless.storage.serialize import Signer, new_secret
from tests.tasks import inc, slow_inc, total


@pytest.fixture
def store(redis_client):
    run = RunStore(redis_client, new_run_id(), ttl_s=60)
    run.create(b"record")
    yield run
    run.purge(8)


def test_a_parent_that_reports_twice_counts_once(store):
    fan_in = [(5, 2)]
    assert store.complete(1, None, fan_in, None, "inv-a") == (0, [])
    assert store.complete(1, None, fan_in, None, "inv-b") == (0, [])
    assert store.complete(2, None, fan_in, None, "inv-a") == (0, [5])
    assert store.complete(2, None, fan_in, None, "inv-b") == (0, [])


def test_a_resent_publish_wins_the_same_child_again(store, redis_client):
    """A worker whose reply was lost (dropped connection, failover) sends the script again:
    it must not lose the child it claimed the first time, or nobody would run it."""
    fan_in = [(5, 2)]
    store.complete(1, None, fan_in, None, "inv-a")
    assert store.complete(2, None, fan_in, None, "inv-b", pending=True) == (0, [5])
    assert store.complete(2, None, fan_in, None, "inv-b", pending=True) == (0, [5])
    assert json.loads(redis_client.hget(store.keys.restart, "inv-b")) == [5]


def test_a_worker_with_pending_work_keeps_its_old_restart_point(store, redis_client):
    store.begin("inv", [0], 5000, want_record=False)
    store.complete(1, None, [(5, 2)], None, "inv", pending=True)
    assert store.complete(2, None, [(5, 2)], None, "inv", pending=True) == (1, [5])
    assert sorted(json.loads(redis_client.hget(store.keys.restart, "inv"))) == [0, 5]
    assert store.complete(3, None, [(6, 1)], None, "inv", pending=False) == (1, [6])
    assert json.loads(redis_client.hget(store.keys.restart, "inv")) == [6]


def test_a_large_output_is_stored_and_never_outlives_its_run(store, redis_client):
    large = b"x" * (1 << 20)
    assert store.complete(1, large, [(3, 2)], None) == (0, [])
    assert redis_client.get(store.keys.output(1)) == large
    store.purge(8)
    assert store.complete(2, large, [(3, 2)], None) is None
    assert not redis_client.exists(store.keys.output(2))


def test_the_load_counts_queued_and_running_invocations(redis_client):
    run = RunStore(redis_client, new_run_id(), ttl_s=60)
    run.create(b"record", invocations=3)
    try:
        assert run.load() == 3
        run.begin("a", [0], 5000, want_record=False)
        assert run.load() == 3
        run.begin("a", [0], 5000, want_record=False)
        run.note_invoked(2)
        assert run.load() == 5
        run.release_lease("a")
        assert run.load() == 4
    finally:
        run.purge(4)


def claims_of_racing_parents(store: RunStore, parents: int) -> int:
    """How many of ``parents`` concurrent completions claim their common child."""
    fan_in = [(parents + 1, parents)]
    with ThreadPoolExecutor(parents) as pool:
        claims = list(pool.map(lambda p: store.complete(p, None, fan_in, None), range(parents)))
    return sum(len(claimed[1]) for claimed in claims if claimed is not None)


def test_exactly_one_of_many_racing_parents_claims_the_child(redis_client):
    for _ in range(20):
        run = RunStore(redis_client, new_run_id(), ttl_s=60)
        run.create(b"record")
        assert claims_of_racing_parents(run, 16) == 1
        run.purge(20)


def test_writes_stop_once_the_run_is_gone(store, redis_client):
    store.purge(8)
    assert store.complete(1, b"value", [(3, 2)], b"[]") is None
    assert store.begin("invocation", [0], 1000, want_record=True) is None
    assert redis_client.exists(store.keys.output(1), store.keys.inbox(3), store.keys.events) == 0


def test_duplicate_invocation_is_claimed_once(store):
    assert store.begin("inv-1", [0], 1000, want_record=True) == (True, b"record")
    assert store.begin("inv-1", [0], 1000, want_record=True) == (False, None)


def test_every_run_key_has_a_ttl(store, redis_client):
    store.complete(1, b"value", [(3, 2)], b"[]")
    for key in (store.keys.record, store.keys.output(1), store.keys.inbox(3), store.keys.events):
        assert 0 < redis_client.ttl(key) <= 60


def test_signed_blobs_refuse_tampering_and_other_secrets():
    signer = Signer(new_secret())
    blob = signer.dumps({"a": [1, 2]}, compress=True)
    assert signer.loads(blob) == {"a": [1, 2]}
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(UntrustedBlobError, match="signature"):
        signer.loads(tampered)
    with pytest.raises(UntrustedBlobError, match="signature"):
        Signer(new_secret()).loads(blob)
    with pytest.raises(UntrustedBlobError, match="not a signed blob"):
        signer.loads(b"\x80\x04K\x01.")


def test_arrays_travel_out_of_band_and_come_back_writable():
    signer = Signer(new_secret())
    array = np.arange(300_000, dtype="float64").reshape(600, 500)
    value = {"block": array, "columns": array[:, ::2], "scale": lambda x: 2 * x}
    blob = signer.dumps(value)
    back = signer.loads(blob)
    np.testing.assert_array_equal(back["block"], array)
    np.testing.assert_array_equal(back["columns"], array[:, ::2])
    back["block"][0, 0] = -1.0
    assert back["scale"](3) == 6
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 1
    with pytest.raises(UntrustedBlobError, match="signature"):
        signer.loads(bytes(tampered))


def test_redact_hides_passwords():
    assert redact("redis://user:hunter2@host:6380/0") == "redis://user:***@host:6380/0"
    assert redact("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"


def test_unreachable_redis_is_a_one_line_error_without_password():
    with pytest.raises(
        ConnectionError, match=r"cannot reach Redis at redis://:\*\*\*@127.0.0.1:1/"
    ) as info:
        Scheduler(redis="redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(info.value)


def test_every_invocation_delivered_twice_gives_the_right_result(redis_url, redis_client):
    secret = new_secret()
    backend = LocalBackend(redis_url, secret, concurrency=2, deliveries=2)
    with Scheduler(redis=redis_url, backend=backend, secret=secret, timeout=120) as sched:
        root = dask.delayed(inc)(0)
        mids = [dask.delayed(slow_inc)(root) for _ in range(12)]
        assert dask.compute(dask.delayed(total)(mids), scheduler=sched) == (24,)
        chain = dask.delayed(inc)(0)
        for _ in range(50):
            chain = dask.delayed(inc)(chain)
        assert dask.compute(chain, scheduler=sched) == (51,)


def test_a_tampered_run_record_fails_the_run(redis_url, redis_client, monkeypatch):
    with Scheduler(redis=redis_url, timeout=60) as sched:
        original = RunStore.create

        def tamper(self, record, *args, **kwargs):
            return original(self, record[:-1] + bytes([record[-1] ^ 1]), *args, **kwargs)

        monkeypatch.setattr(RunStore, "create", tamper)
        with pytest.raises(UntrustedBlobError, match="run record"):
            dask.compute(dask.delayed(inc)(1), scheduler=sched)
