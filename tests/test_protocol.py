"""The Redis protocol's guarantees: idempotent fan-in, one claimer, signed blobs, TTLs."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import pytest
import redis
from dask._task_spec import DataNode, Task, TaskRef

from dask_serverless import Scheduler, UntrustedBlobError
from dask_serverless.backends.local import LocalBackend
from dask_serverless.graph import translate
from dask_serverless.protocol.history import HistoryStore
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.keys import new_run_id, task_history_key
from dask_serverless.protocol.record import (
    NODES_PER_PART,
    OUTPUT,
    RECORD,
    RESULT,
    PackedNodes,
    RunRecord,
    RunSigner,
    open_record,
    seal_record,
)
from dask_serverless.protocol.store import RunStore, redact
from dask_serverless.storage.embedded import EmbeddedRedis
from dask_serverless.storage.serialize import Signer, new_secret
from dask_serverless.worker.branch import Branch, RunGone
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
    run.create(b"record", [Invocation.new(run.run_id, [i], 60, 5000) for i in range(3)])
    try:
        assert run.load() == 3
        first = run.queued_invocations()[0].invocation_id
        run.begin(first, [0], 5000, want_record=False)
        assert run.load() == 3
        run.begin(first, [0], 5000, want_record=False)
        assert run.load() == 3
        assert run.note_invoked([Invocation.new(run.run_id, [i], 60, 5000) for i in (3, 4)])
        assert run.load() == 5
        run.release_lease(first)
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


def test_a_large_output_goes_to_redis_in_parts_and_is_read_as_one_signed_blob(store, redis_client):
    """The array data leaves from the array's own memory (no joined copy); what Redis
    holds is the very blob ``dumps`` would make, signed over every byte, and a byte
    changed in the array data is refused."""
    signer = RunSigner(Signer(new_secret()), store.run_id)
    array = np.arange(500 * 500, dtype="float64").reshape(500, 500)
    parts = signer.dumps_parts(array, OUTPUT, 1)
    assert len(parts) > array.nbytes
    assert any(isinstance(part, memoryview) for part in parts.parts)
    assert store.complete(1, parts, [(3, 2)], None, "inv") == (0, [])
    (blob,) = store.fetch_outputs([1])
    assert blob == bytes(parts)
    back = signer.loads(blob, OUTPUT, 1)
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable
    tampered = bytearray(blob)
    tampered[-8] ^= 1
    with pytest.raises(UntrustedBlobError, match="signature"):
        signer.loads(bytes(tampered), OUTPUT, 1)
    with pytest.raises(UntrustedBlobError, match="signature"):
        signer.loads(blob, OUTPUT, 2)


def test_a_large_output_whose_set_was_refused_counts_nothing(store, redis_client):
    """The complete script of a large output runs after its SET in the same round trip; if
    the SET did not store the output, the parent is not counted and no child is claimed."""
    if store.cluster:
        pytest.skip("on a cluster an output has a slot of its own and is stored before")
    keys = store.keys
    script_keys = [keys.record, keys.events, keys.leases, keys.restart, keys.queued]
    script_keys += [keys.output(1), keys.inbox(3)]
    with pytest.raises(Exception, match="was not stored"):
        store._complete(keys=script_keys, args=[60, "preset", b"", 1, b"", "inv", "replace", 3, 1])
    assert not redis_client.exists(keys.inbox(3))


def test_redact_hides_passwords():
    assert redact("redis://user:hunter2@host:6380/0") == "redis://user:***@host:6380/0"
    assert redact("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"
    assert redact("redis://host/0?password=hunter2&db=1") == "redis://host/0?password=***&db=1"
    assert redact("rediss://u@h/0?ssl_password=x") == "rediss://u@h/0?ssl_password=***"
    assert redact("unix://:hunter2@/tmp/r.sock?db=0") == "unix://:***@/tmp/r.sock?db=0"


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


@pytest.mark.parametrize("how", ["flipped", "moved-from-another-run", "an-output-as-record"])
def test_a_tampered_run_record_fails_the_run(redis_url, redis_client, monkeypatch, how):
    """A flipped bit, a validly signed record of another run, or a validly signed blob
    of another kind put under the record key: each is refused before it is unpickled."""
    with Scheduler(redis=redis_url, timeout=60) as sched:
        # RunStore.create, not a Redis command: standalone and cluster clients alike
        original = RunStore.create
        other_run = RunSigner(sched._signer, new_run_id())
        stolen: list[bytes] = []

        def tamper(self, record, *args, **kwargs):
            if how == "flipped":
                record = record[:-1] + bytes([record[-1] ^ 1])
            elif how == "an-output-as-record":
                record = RunSigner(sched._signer, self.run_id).dumps("not a record", OUTPUT, 0)
            elif stolen:
                record = stolen[0]
            else:
                stolen.append(record)
            return original(self, record, *args, **kwargs)

        monkeypatch.setattr(RunStore, "create", tamper)
        if how == "moved-from-another-run":
            assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)
        with pytest.raises(UntrustedBlobError, match="run record"):
            dask.compute(dask.delayed(inc)(1), scheduler=sched)
        assert other_run.loads(other_run.dumps(1, RECORD), RECORD) == 1


def test_a_signature_binds_run_kind_and_slot():
    signer = Signer(new_secret())
    run, other = RunSigner(signer, new_run_id()), RunSigner(signer, new_run_id())
    blob = run.dumps([1, 2], OUTPUT, 3)
    assert run.loads(blob, OUTPUT, 3) == [1, 2]
    for reader, kind, slot in [(run, OUTPUT, 4), (other, OUTPUT, 3), (run, RESULT, None)]:
        with pytest.raises(UntrustedBlobError, match="moved from another key"):
            reader.loads(blob, kind, slot, label="output of 'x' (key dsl:{r}:o:4)")


def test_invoked_children_are_noted_as_queued_then_sent_each_in_its_configuration(redis_client):
    """A worker notes what it invokes before sending it: should the platform lose an
    invocation before it begins, the client finds it there and sends it again."""
    from tests.unit.test_branch import Sent, children, fan_out

    dag = fan_out(2)
    memory: list[int | None] = [None] * len(dag)
    first, second = children(dag, 2)
    memory[second] = 3008
    run_id = new_run_id()
    store = RunStore(redis_client, run_id, ttl_s=60)
    store.create(b"record")
    branch = Branch(
        record=RunRecord(run_id, dag, memory=tuple(memory)),
        store=store,
        signer=RunSigner(Signer(new_secret()), run_id),
        invoker=Sent(),
        worker_id="test",
    )
    try:
        before = time.time()
        branch.invoke([first, second])
        sent = branch.invoker.invocations  # type: ignore[attr-defined]
        assert [i.tasks for i in sent] == [(first,), (second,)]
        assert [i.memory_mb for i in sent] == [None, 3008]
        assert all(i.run_id == run_id and i.sent_at >= before for i in sent)
        noted = {(i.invocation_id, i.tasks, i.memory_mb) for i in store.queued_invocations()}
        assert noted == {(i.invocation_id, i.tasks, i.memory_mb) for i in sent}
        store.purge(len(dag))
        # no write recreates a key of a run that is gone
        with pytest.raises(RunGone):
            branch.invoke([first])
        assert not redis_client.exists(store.keys.queued)
    finally:
        store.purge(len(dag))


def test_history_store_holds_what_redis_holds_and_sees_other_clients_appends(redis_client):
    function = f"held-{new_run_id()}"
    ours = HistoryStore(redis_client, samples=3, ttl_s=60)
    other = HistoryStore(redis_client, samples=3, ttl_s=60)
    ours.append({(function, 512): [[1, 0, 0.1]]}, {}, {})
    assert ours.load([function], [512])[0] == {(function, 512): [[1, 0, 0.1]]}
    # Its own appends are applied to what it holds, newest first and trimmed, as Redis does.
    ours.append({(function, 512): [[2, 0, 0.2], [3, 0, 0.3], [4, 0, 0.4]]}, {}, {})
    expected = [[4, 0, 0.4], [3, 0, 0.3], [2, 0, 0.2]]
    assert ours.load([function], [512])[0] == {(function, 512): expected}
    key = task_history_key(function, 512)
    assert [json.loads(e) for e in redis_client.lrange(key, 0, -1)] == expected
    # Another client's append is seen at the next load.
    other.append({(function, 512): [[5, 0, 0.5]]}, {}, {})
    assert ours.load([function], [512])[0] == {(function, 512): [[5, 0, 0.5], *expected[:2]]}
    ours.append({(function, 512): [[6, 0, 0.6]]}, {}, {})
    assert ours.load([function], [512])[0] == {
        (function, 512): [[6, 0, 0.6], [5, 0, 0.5], [4, 0, 0.4]]
    }


def test_a_sealed_record_rebuilds_its_tasks_as_they_are_used():
    signer = Signer(new_secret())
    graph = {"a": Task("a", inc, 1), "b": Task("b", inc, TaskRef("a")), "c": DataNode("c", 5)}
    dag = translate(graph, ["b", "c"])
    opened = open_record(signer, seal_record(signer, RunRecord("run", dag)), "run")
    nodes = opened.dag.nodes
    assert isinstance(nodes, PackedNodes) and len(nodes) == len(dag)
    a, b, c = (nodes[dag.index[key]] for key in ("a", "b", "c"))
    assert a({}) == 2 and b({"a": 2}) == 3 and c({}) == 5
    assert nodes[-1] is None and nodes[dag.index["a"]] is a


def test_a_large_sealed_record_rebuilds_tasks_from_every_part():
    signer = Signer(new_secret())
    count = 2 * NODES_PER_PART + 5
    graph = {f"x-{i}": Task(f"x-{i}", inc, i) for i in range(count)}
    dag = translate(graph, list(graph))
    nodes = open_record(signer, seal_record(signer, RunRecord("run", dag)), "run").dag.nodes
    for key in ("x-0", f"x-{NODES_PER_PART}", f"x-{count - 1}"):
        assert nodes[dag.index[key]]({}) == int(key.split("-")[1]) + 1
    assert nodes[-1] is None and len(nodes[:]) == len(dag)


def test_a_script_refused_for_want_of_memory_raises_out_of_memory():
    """Redis 6 words a write refused inside a script as a script error; every script
    call raises it as the ``OutOfMemoryError`` a plain command gets, so that the worker
    reports a full Redis instead of crashing on it."""
    with EmbeddedRedis(tcp=True, extra_args=["--maxmemory-policy", "noeviction"]) as server:
        client = redis.Redis.from_url(server.url)
        store = RunStore(client, new_run_id(), 60)
        client.set(store.keys.record, b"alive")
        client.set("filler", b"x" * 4_000_000)
        # Full: the limit is below what the server holds already.
        client.config_set("maxmemory", "2mb")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("more", b"x")
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="OOM"):
            store.fail(b"error", b"events")
        client.close()


def test_computes_longer_than_the_run_ttl_keep_their_keys_alive(redis_url):
    # A one-second TTL: the Scheduler's keep-alive thread refreshes every quarter second,
    # for the runs in progress at once and for the ones after them.
    with Scheduler(redis_url, run_ttl=1) as sched:
        steps = [dask.delayed(slow_inc)(i, 1.5) for i in range(2)]
        assert dask.compute(steps, scheduler=sched) == ([1, 2],)
        with ThreadPoolExecutor(2) as pool:
            both = [pool.submit(dask.compute, step, scheduler=sched) for step in steps]
            assert [f.result() for f in both] == [(1,), (2,)]
