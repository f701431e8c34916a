"""The invocation payload and the local platform's queue of invocations; no Redis."""

from __future__ import annotations

import json

import pytest

from dask_serverless.backends.local.queue import InvocationQueue
from dask_serverless.constants import DEFAULT_LEASE_MS
from dask_serverless.protocol.invocation import InvalidInvocationError, Invocation

RUN = "0123456789abcdef0123456789abcdef"


def test_a_payload_survives_json_and_comes_back_equal():
    sent = Invocation.new(RUN, [3, 7], ttl_s=600, lease_ms=5000, done=[1, 2], memory_mb=1024)
    payload = json.loads(json.dumps(sent.to_payload()))
    assert payload["run"] == RUN and payload["tasks"] == [3, 7] and payload["memory"] == 1024
    back = Invocation.from_payload(payload)
    assert back.tasks == (3, 7) and back.done == (1, 2) and back.memory_mb == 1024
    assert back.invocation_id == sent.invocation_id
    assert back.sent_at == pytest.approx(sent.sent_at, abs=1e-6)


def test_optional_fields_are_left_out_and_defaulted():
    payload = Invocation(RUN, "inv", (0,), 60).to_payload()
    assert payload == {"run": RUN, "id": "inv", "tasks": [0], "ttl": 60, "lease": DEFAULT_LEASE_MS}
    minimal = Invocation.from_payload({"run": RUN, "id": "inv", "tasks": [0], "ttl": 60})
    assert minimal.lease_ms == DEFAULT_LEASE_MS
    assert minimal.done == () and minimal.memory_mb is None and minimal.sent_at is None


def test_every_new_invocation_gets_its_own_id():
    ids = {Invocation.new(RUN, [0], 60, 5000).invocation_id for _ in range(100)}
    assert len(ids) == 100


def test_the_payload_holds_no_secret_and_no_address():
    payload = Invocation.new(RUN, [0], 60, 5000).to_payload()
    assert set(payload) <= {"run", "id", "tasks", "ttl", "lease", "done", "memory", "at"}


GOOD = {"run": RUN, "id": "inv", "tasks": [0, 4], "ttl": 60, "lease": 5000, "at": 1.5}


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        ([1, 2], "JSON object"),
        (None, "JSON object"),
        ({k: v for k, v in GOOD.items() if k != "run"}, "'run'"),
        ({**GOOD, "run": ""}, "'run'"),
        ({**GOOD, "id": 7}, "'id'"),
        ({k: v for k, v in GOOD.items() if k != "tasks"}, "'tasks'"),
        ({**GOOD, "tasks": "0"}, "'tasks'"),
        ({**GOOD, "tasks": [0, -1]}, "'tasks'"),
        ({**GOOD, "tasks": [True]}, "'tasks'"),
        ({**GOOD, "tasks": [1.5]}, "'tasks'"),
        ({k: v for k, v in GOOD.items() if k != "ttl"}, "'ttl'"),
        ({**GOOD, "ttl": 0}, "'ttl'"),
        ({**GOOD, "ttl": "60"}, "'ttl'"),
        ({**GOOD, "lease": -5}, "'lease'"),
        ({**GOOD, "done": {"a": 1}}, "'done'"),
        ({**GOOD, "memory": "1769"}, "'memory'"),
        ({**GOOD, "at": "now"}, "'at'"),
        ({**GOOD, "secret": "hunter2"}, "unknown invocation field"),
    ],
)
def test_a_malformed_payload_is_refused_naming_the_field(payload, complaint):
    with pytest.raises(InvalidInvocationError, match=complaint):
        Invocation.from_payload(payload)


def test_a_refused_payload_is_a_value_error():
    assert issubclass(InvalidInvocationError, ValueError)


def invocation(name: str, memory_mb: int | None = None) -> Invocation:
    return Invocation(RUN, name, (0,), 60, memory_mb=memory_mb)


def test_the_queue_keeps_arrival_order_across_configurations():
    queue = InvocationQueue(default_memory_mb=1769)
    queue.extend([invocation("a"), invocation("b", 512), invocation("c", 1769), invocation("d")])
    assert len(queue) == 4
    oldest = queue.oldest(3)
    assert [i.invocation_id for _n, i in oldest] == ["a", "b", "c"]
    assert [queue.memory_of(i) for _n, i in oldest] == [1769, 512, 1769]
    queue.remove(oldest[1][0])
    assert [i.invocation_id for _n, i in queue.oldest(10)] == ["a", "c", "d"]


def test_a_redelivered_invocation_goes_first():
    queue = InvocationQueue(default_memory_mb=1769)
    queue.extend([invocation("a"), invocation("b")])
    queue.appendleft(invocation("lost"))
    assert [i.invocation_id for _n, i in queue.oldest(1)] == ["lost"]
    queue.clear()
    assert len(queue) == 0
