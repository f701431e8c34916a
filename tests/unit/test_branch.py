"""How a worker splits ready children and shares queued work: state changes of a branch,
decided without Redis.

The branch's store points at a socket that does not exist, so any Redis command these
decisions sent would fail the test.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import add

import pandas as pd
import redis
from dask.sizeof import sizeof

from dask_serverless.graph import DAG, translate
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.keys import new_run_id
from dask_serverless.protocol.record import RunRecord, RunSigner
from dask_serverless.protocol.store import RunStore
from dask_serverless.storage.serialize import Signer, new_secret
from dask_serverless.worker.branch import Branch
from dask_serverless.worker.cache import OutputCache
from dask_serverless.worker.loop import WorkerLogic
from tests.tasks import inc, total


class Sent:
    """An invoker that keeps what it was asked to start."""

    def __init__(self) -> None:
        self.invocations: list[Invocation] = []

    def invoke(self, invocations: Sequence[Invocation]) -> None:
        self.invocations.extend(invocations)


def fan_out(children: int) -> DAG:
    """``root`` with ``children`` single-dependency children, gathered by ``total``."""
    dsk: dict = {"root": 1, **{f"child-{i}": (inc, "root") for i in range(children)}}
    dsk["total"] = (total, [f"child-{i}" for i in range(children)])
    return translate(dsk, "total")


def branch_of(dag: DAG, signer: RunSigner | None = None, **record: object) -> Branch:
    run_id = new_run_id() if signer is None else signer.run_id
    nowhere = redis.Redis(unix_socket_path="/nonexistent/dask-serverless-test.sock")
    return Branch(
        record=RunRecord(run_id, dag, **record),  # type: ignore[arg-type]
        store=RunStore(nowhere, run_id, ttl_s=60),
        signer=signer or RunSigner(Signer(new_secret()), run_id),
        invoker=Sent(),
        worker_id="test",
    )


def children(dag: DAG, count: int) -> list[int]:
    return [dag.index[f"child-{i}"] for i in range(count)]


def test_without_a_known_concurrency_the_first_child_stays_and_the_rest_go():
    dag = fan_out(3)
    branch = branch_of(dag)
    ready = children(dag, 3)
    here, elsewhere = WorkerLogic().split(branch, dag.index["root"], ready)
    assert here == ready[:1] and elsewhere == ready[1:]


def test_children_go_elsewhere_only_as_far_as_the_platform_has_room():
    dag = fan_out(4)
    branch = branch_of(dag, concurrency=4)
    branch.note_load(2)
    ready = children(dag, 4)
    here, elsewhere = WorkerLogic().split(branch, dag.index["root"], ready)
    assert elsewhere == ready[1:3]
    assert here == [ready[0], ready[3]]


def test_a_full_platform_keeps_every_child_here():
    dag = fan_out(3)
    branch = branch_of(dag, concurrency=2)
    branch.note_load(2)
    here, elsewhere = WorkerLogic().split(branch, dag.index["root"], children(dag, 3))
    assert elsewhere == [] and len(here) == 3


def test_a_clustered_output_keeps_its_children_together():
    dag = fan_out(3)
    branch = branch_of(dag)
    root = dag.index["root"]
    branch.clustered.add(root)
    here, elsewhere = WorkerLogic().split(branch, root, children(dag, 3))
    assert here == children(dag, 3) and elsewhere == []


def test_a_child_planned_for_another_configuration_goes_to_a_worker_of_it():
    dag = fan_out(2)
    memory = [1769] * len(dag)
    first, second = children(dag, 2)
    memory[second] = 3008
    branch = branch_of(dag, memory=tuple(memory))
    branch.memory_mb = 1769
    here, elsewhere = WorkerLogic().split(branch, dag.index["root"], [first, second])
    assert here == [first] and elsewhere == [second]


def test_internal_children_of_a_bundle_always_stay():
    dag = translate({"a": 1, "b": 2, "c": (add, "a", "b")}, "c")
    c = dag.index["c"]
    branch = branch_of(dag, internal=frozenset({c}))
    assert branch.count_local(c) is False
    assert branch.count_local(c) is True
    here, elsewhere = WorkerLogic().split(branch, dag.index["b"], [c])
    assert here == [c] and elsewhere == []


def test_a_bundle_handed_on_half_way_counts_only_the_parents_left():
    dag = translate({"a": 1, "b": 2, "c": (add, "a", "b")}, "c")
    c = dag.index["c"]
    branch = branch_of(dag, internal=frozenset({c}))
    branch.done_before = [dag.index["a"]]
    assert branch.count_local(c) is True


def test_sharing_moves_queued_tasks_from_the_bottom_as_far_as_there_is_room():
    dag = fan_out(5)
    branch = branch_of(dag, concurrency=8)
    stack = children(dag, 5)
    logic = WorkerLogic()
    assert logic.movable(branch, stack, spare=2) == stack[:2]
    assert logic.movable(branch, stack, spare=10) == stack[:-1]
    assert logic.movable(branch, stack, spare=0) == []


def test_sharing_keeps_bundle_members_and_tasks_of_other_configurations():
    dag = fan_out(4)
    memory = [1769] * len(dag)
    stack = children(dag, 4)
    memory[stack[1]] = 512
    branch = branch_of(dag, concurrency=8, memory=tuple(memory))
    branch.memory_mb = 1769
    assert WorkerLogic().movable(branch, stack, spare=8) == [stack[0], stack[2]]


def test_a_queue_of_bundle_members_is_not_shared_and_asks_redis_nothing():
    # The children are bundle members (internal), queued under a movable task: the fixed
    # bottom is remembered, and found again after the queue shrinks and grows.
    dag = fan_out(6)
    queued = children(dag, 6)
    bundle, loose = queued[:4], queued[4:]
    branch = branch_of(dag, concurrency=8, internal=frozenset(bundle))
    branch.load_checked = 0.0  # a load read would be due: Redis is unreachable here
    logic = WorkerLogic()
    assert logic.share(branch, list(bundle)) == []
    stack = [*bundle, loose[0], loose[1]]
    assert logic.movable(branch, stack, spare=8) == [loose[0]]
    stack.pop()
    stack.pop()
    stack.pop()  # a bundle member below the remembered bottom's top runs
    stack.append(loose[1])
    stack.append(loose[0])
    assert logic.movable(branch, stack, spare=8) == [loose[1]]


def test_sharing_keeps_tasks_that_read_a_large_output_held_here():
    dag = fan_out(3)
    branch = branch_of(dag, concurrency=8, cluster_output_bytes=1000)
    root = dag.index["root"]
    branch.hold(root, b"x" * 5000, consumers=3)
    branch.unstored.add(root)
    assert WorkerLogic().movable(branch, children(dag, 3), spare=8) == []


def test_sharing_asks_nothing_without_a_known_concurrency_or_a_queue():
    dag = fan_out(3)
    logic = WorkerLogic()
    assert logic.share(branch_of(dag), children(dag, 3)) == []
    assert logic.share(branch_of(dag, concurrency=4), children(dag, 1)) == []


def test_held_values_are_released_after_their_last_use():
    dag = fan_out(2)
    branch = branch_of(dag)
    root = dag.index["root"]
    branch.hold(root, "value", consumers=2)
    assert branch.take_held(root) == "value"
    assert root in branch.values
    assert branch.take_held(root) == "value"
    assert root not in branch.values


def test_an_output_read_elsewhere_keeps_the_size_its_producer_measured():
    """The reader of a stored output (another worker) and a cache hit take the producer's
    ``dask.sizeof`` with the value: a frame is sized once per run, and every task's input
    bytes add up its producers' output bytes."""
    dag = fan_out(2)
    producer = branch_of(dag)
    reader = branch_of(dag, producer.signer)
    reader.cache = OutputCache(2**30)
    root = dag.index["root"]
    frame = pd.DataFrame({"user": range(1_000), "amount": [0.5] * 1_000})
    blob = bytes(producer.output_blob(root, frame))
    opened = reader.open_output(root, blob)
    pd.testing.assert_frame_equal(opened, frame)
    assert reader.sizes[root] == producer.size_of(root, frame) == sizeof(frame)
    reader.remember(root, opened)
    later = branch_of(dag, producer.signer)
    later.cache = reader.cache
    assert later.cached(root)[0] and later.sizes[root] == producer.sizes[root]
