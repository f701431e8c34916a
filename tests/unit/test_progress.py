"""A run's progress as the client folds the workers' events; no Redis."""

from __future__ import annotations

import pytest
from dask.callbacks import Callback

from dask_serverless.client.progress import RunProgress
from dask_serverless.graph import translate
from dask_serverless.protocol import events
from tests.tasks import inc


def chain():
    return translate({"a": 1, "b": (inc, "a"), "c": (inc, "b")}, "c")


class Recorder(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def _start(self, dsk):
        self.calls.append(("start", sorted(dsk)))

    def _start_state(self, dsk, state):
        self.calls.append(("start_state", sorted(state["ready"])))

    def _pretask(self, key, dsk, state):
        self.calls.append(("pretask", key, key in state["running"]))

    def _posttask(self, key, result, dsk, state, worker_id):
        self.calls.append(("posttask", key, result, worker_id, key in state["finished"]))

    def _finish(self, dsk, state, errored):
        self.calls.append(("finish", errored, sorted(state["finished"])))


def test_callbacks_see_every_task_once_in_the_order_the_workers_report():
    dag = chain()
    recorder = Recorder()
    progress = RunProgress(dag, callbacks=[recorder._callback])
    progress.start()
    a, b = dag.index["a"], dag.index["b"]
    progress.apply([events.done(a, "w1", 0.0, 0.1), events.done(a, "w2", 0.0, 0.1)])
    progress.apply([events.done(b, "w1", 0.1, 0.1)])
    progress.finish(failed=False)
    assert recorder.calls == [
        ("start", ["a", "b", "c"]),
        ("start_state", ["a"]),
        ("pretask", "a", True),
        ("posttask", "a", None, "w1", True),
        ("pretask", "b", True),
        ("posttask", "b", None, "w1", True),
        ("finish", False, ["a", "b"]),
    ]
    assert progress.seen == {a, b}
    assert len(progress.task_events) == 2


def test_without_callbacks_the_run_is_not_followed_but_still_measured():
    dag = chain()
    progress = RunProgress(dag)
    assert not progress.follows
    progress.apply([events.done(0, "w", 0.0, 0.1, [1769, 1, 8, 8, 0.0, 0.1, 0]), ["unknown"]])
    assert progress.seen == {0} and progress.state == {}


def test_the_first_error_decides_and_retries_keep_their_highest_attempt():
    progress = RunProgress(chain())
    progress.apply([events.retry(1, 1, "boom"), events.retry(1, 3, "boom")])
    progress.apply([events.retry(1, 2, "boom"), events.error(1), events.error(0)])
    assert progress.retries == {1: 3}
    assert progress.failed_index == 1
    assert not progress.finished


def test_finished_uploads_and_invocations_are_recorded():
    progress = RunProgress(chain())
    batch = events.encode(
        [
            events.upload(0, 0.25),
            events.invocation_started("w", 1769, True, 0.5, "i1", 1.0),
            events.finished(),
        ]
    )
    progress.apply(events.decode(batch))
    assert progress.finished
    assert progress.uploads == {0: 0.25}
    assert progress.invocations == [[events.INVOCATION, "w", 1769, 1, 0.5, "i1", 1.0]]


def test_an_out_of_memory_kill_is_a_retry():
    progress = RunProgress(chain())
    progress.apply(events.decode(events.encode([events.out_of_memory(1, 512)])))
    assert progress.out_of_memory == [(1, 512)]
    assert progress.retries == {1: 1}


def test_finish_reaches_only_callbacks_that_started():
    class Failing(Callback):
        def _start(self, dsk):
            raise RuntimeError("cannot start")

    recorder = Recorder()
    progress = RunProgress(chain(), callbacks=[recorder._callback, Failing()._callback])
    with pytest.raises(RuntimeError, match="cannot start"):
        progress.start()
    progress.finish(failed=True)
    assert recorder.calls[-1] == ("finish", True, [])
