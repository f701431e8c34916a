"""The branch loop a worker runs for one invocation, and the hooks that shape it.

An invocation names a run and the node(s) it starts with. The worker follows a *branch*:

1. **gather** the node's inputs — outputs it still holds in memory, the rest with one
   ``MGET`` from Redis;
2. **execute** the node's task-spec with those inputs;
3. **publish**: decide whether the output must be stored (only if a consumer may run in
   another worker), then one atomic script stores it, appends the batched events and counts
   this node once in the inbox of every fan-in child, claiming those it completes (I-3).
   Children with this node as their only dependency are ready without asking Redis;
4. **split** the ready children: continue with one here, keeping the output in memory, and
   invoke new workers for the others in one concurrent batch — unless the run was planned
   as worth one invocation and is still within its time (``WorkerLogic.keeps_local``):
   then every child runs here.

The loop ends when no ready child is left, when a task fails (its exception is recorded and
the client told), when the run is gone (finished, failed or cancelled — every script reports
that), or at the sink: the worker that reaches it stores the result, deletes every
intermediate key of the run and announces ``finished``.

A chain therefore runs in one worker with no Redis round trip per task; events are flushed
at most every ``EVENT_FLUSH_S`` seconds. ``WorkerLogic`` holds the four stages, and the end at
the sink, as methods so a planner's optimisation (or the client, running its own share of
a run: ``client.placed``) can override one without forking the loop.

Faults:

* a task that raises — any ``BaseException``, ``SystemExit`` included — fails the run
  with its own exception, or is retried in place, ``retries`` times (the run's default or the
  task's ``dask.annotate(retries=…)``) with exponential backoff; each retry is an event;
* the invocation holds a *lease* in Redis that the instance renews in the background
  while it works (see ``handler.Heartbeat``). If the instance dies, the lease lapses and
  the client re-invokes the lease's *restart point*: the invocation's start nodes, moved
  forward atomically whenever the worker wins a fan-in child (the only work nobody else
  can claim any more). Re-executed work is harmless because every fan-in counts a parent
  once and every child is claimed once (I-3);
* Redis refusing a write — out of memory, or a value above its bulk limit — is a
  ``StoreRefusedError`` naming the key and the size, recorded as the task's error (the
  run's outputs are dropped first if Redis is too full to take even that), never a loop
  of re-invocations; the result is held to ``serverless.max-output-bytes`` like any
  output;
* the renewal also tells the worker when its run is gone (cancelled, failed elsewhere, or
  timed out): it stops before starting another task.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import dask.config
import redis
from dask.utils import shorten_traceback

from dask_serverless.protocol import events
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.placement import output_leaves_worker
from dask_serverless.protocol.record import LITERAL, RESULT
from dask_serverless.worker.branch import Branch, MissingOutputError, OutputTooLargeError, RunGone
from dask_serverless.worker.metrics import RunDelayClock, TaskMeter

# How often a worker with queued work re-reads the run's load (see ``WorkerLogic.share``).
LOAD_CHECK_S = 0.02

logger = logging.getLogger(__name__)


def run_branch(branch: Branch, starts: Sequence[int], logic: WorkerLogic) -> None:
    """Follow the branch from ``starts`` until it ends; see the module docstring.

    Warnings are recorded for the whole invocation (whatever the instance's filters: the
    client applies its own when it re-emits them); ``execute_with_retries`` takes those a
    task raised. The run-delay clock is opened here, by the thread that runs the tasks.
    """
    clock = branch.run_delay = RunDelayClock()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            follow_branch(branch, starts, logic, caught)
    finally:
        clock.close()


def follow_branch(
    branch: Branch, starts: Sequence[int], logic: WorkerLogic, caught: list[Any]
) -> None:
    """The branch loop itself; ``caught`` collects the warnings raised meanwhile."""
    dag = branch.dag
    stack = list(starts)
    try:
        while stack:
            if branch.cancelled():
                raise RunGone()
            index = stack.pop()
            # Rebuilt before the task is timed: unpickling its part of the record (and
            # importing what its function needs) is the invocation's setup, not the task.
            dag.nodes[index]
            meter = TaskMeter(branch, index)
            try:
                inputs = logic.gather(branch, index)
                meter.gathered()
                if index == dag.sink:
                    logic.finish(branch, inputs)
                    return
                value = execute_with_retries(branch, logic, index, inputs, caught)
                branch.pending_events.append(meter.done(inputs, value))
                ready = logic.publish(branch, index, value, last_step=not stack)
                meter.published(index not in branch.unstored)
            except (RunGone, redis.RedisError, redis.RedisClusterException):
                # Redis failing is not the task's fault: the lease lapses, the work is re-run.
                raise
            except BaseException as exc:
                # SystemExit, KeyboardInterrupt … raised by a task are its error: recorded
                # like any other, they do not end the worker (the loop would re-run it).
                fail_run(branch, index, exc)
                return
            here, elsewhere = logic.split(branch, index, ready)
            if elsewhere and index in branch.unstored:
                store_held(branch, index, value)
            branch.invoke(elsewhere)
            internal = branch.record.internal
            waiting_here = sum(1 for c in dag.dependents[index] if c in internal)
            branch.hold(index, value, waiting_here + sum(1 for c in here if c not in internal))
            branch.completed.append(index)
            stack.extend(here)
            shared = logic.share(branch, stack)
            if shared:
                hand_on(branch, shared)
                stack[:] = [i for i in stack if i not in shared]
            if stack and logic.hand_off_due(branch):
                hand_off(branch, stack)
                stack.clear()
        branch.flush()
        if branch.lease_held:
            branch.store.release_lease(branch.invocation_id)
    except RunGone:
        return


def execute_with_retries(
    branch: Branch,
    logic: WorkerLogic,
    index: int,
    inputs: dict[int, Any],
    caught: list[Any] | None = None,
) -> Any:
    """Run the task, retrying it in place with exponential backoff while retries remain.

    The warnings the task adds to ``caught`` are sent as events, once per distinct
    warning; the client re-emits them under its own filters, as if the task ran there.
    """
    record = branch.record
    retries = int(branch.dag.annotation(index, "retries", record.retries) or 0)
    attempt = 0
    caught = [] if caught is None else caught
    while True:
        caught.clear()  # what the worker itself raised since the last task is not the task's
        try:
            try:
                return logic.execute(branch, index, inputs)
            finally:
                report_warnings(branch, index, caught)
                caught.clear()
        except Exception as exc:
            if attempt >= retries or branch.cancelled():
                raise
            attempt += 1
            logger.info(
                "task %s failed (%r); retry %d of %d",
                branch.dag.keys[index],
                exc,
                attempt,
                retries,
                extra={"run_id": record.run_id},
            )
            branch.pending_events.append(events.retry(index, attempt, repr(exc)[:200]))
            time.sleep(record.retry_backoff_s * 2 ** (attempt - 1))


def report_warnings(branch: Branch, index: int, caught: Sequence[Any]) -> None:
    """Queue a ``warn`` event for each distinct warning ``caught`` while running ``index``."""
    seen = set()
    for message in caught:
        category = message.category
        event = events.warning(
            index,
            f"{category.__module__}:{category.__qualname__}",
            str(message.message),
            str(message.filename),
            int(message.lineno or 0),
        )
        if tuple(event) not in seen:
            seen.add(tuple(event))
            branch.pending_events.append(event)


def task_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without the worker's own frames, shortened as dask's ``shorten_traceback``
    does (the patterns of ``admin.traceback.shorten``, which lists this package)."""
    paths = dask.config.get("admin.traceback.shorten", [])
    if not paths or tb is None:
        return tb
    engine = re.compile(".*(" + "|".join(paths) + ")")
    while tb.tb_next is not None and engine.match(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return shorten_traceback.shorten(tb)


def hand_off(branch: Branch, stack: Sequence[int]) -> None:
    """Store the held outputs the rest of the branch needs; invoke fresh workers for it.

    The tasks on ``stack`` are already claimed by this invocation, so handing them on is
    safe: the new invocations read their inputs from Redis like any other worker.
    """
    for index in [i for i in branch.values if i in branch.unstored]:
        store_held(branch, index, branch.values[index])
    branch.values.clear()
    branch.uses.clear()
    if branch.record.internal:
        # One invocation carries the rest of the bundle and what is already done of it,
        # so that its internal nodes still count their parents right.
        done = [*branch.done_before, *branch.completed]
        branch.send(
            [Invocation.new(branch.record.run_id, stack, branch.store.ttl_s, branch.lease_ms, done)]
        )
    else:
        branch.invoke(stack)


def in_bundle(branch: Branch, index: int) -> bool:
    """Is ``index`` a bundle member: internal itself, or a parent of an internal node?"""
    internal = branch.record.internal
    return index in internal or any(c in internal for c in branch.dag.dependents[index])


def fixed_bottom(stack: Sequence[int], fixed: list[int], stays: Callable[[int], bool]) -> int:
    """How many entries at the bottom of a branch's queue ``stack`` can never be handed
    on (``stays``: bundle members, tasks of another configuration), up to the first
    that could; ``fixed`` is that bottom as last seen, updated here.

    Remembered, so a bundle queueing thousands of roots does not re-check them all after
    every task (quadratic in the bundle's size). The queue only loses entries at its top
    (a task taken to run) or above the fixed bottom (tasks handed on), and a node is
    queued once: where a remembered entry is still in its place, it and everything below
    it are unchanged. So the remembered bottom is cut back to the highest entry still in
    place, then extended upwards. The platform model (``planning.simulate``) shares it.
    """
    count = min(len(fixed), len(stack))
    while count and stack[count - 1] != fixed[count - 1]:
        count -= 1
    del fixed[count:]
    while count < len(stack) - 1 and stays(stack[count]):
        fixed.append(stack[count])
        count += 1
    return count


def stays_here(branch: Branch, index: int) -> bool:
    """Whether a queued ``index`` can never be handed on: a bundle member, or a task
    planned for another configuration."""
    return in_bundle(branch, index) or not branch.fits(index)


def hand_on(branch: Branch, tasks: Sequence[int]) -> None:
    """Give queued ``tasks`` to new workers: store the held inputs they need, invoke."""
    for task in tasks:
        for parent in branch.dag.dependencies[task]:
            if parent in branch.values:
                if parent in branch.unstored:
                    store_held(branch, parent, branch.values[parent])
                branch.take_held(parent)
    branch.invoke(tasks)


def store_held(branch: Branch, index: int, value: Any) -> None:
    """Store an output that was meant to stay in this worker but now must leave it."""
    if branch.store.complete(index, branch.output_blob(index, value), (), None) is None:
        raise RunGone()
    branch.unstored.discard(index)


def load_literal(branch: Branch, index: int) -> Any:
    """A node the client stored under its own key: it carries large literal data."""
    blob = branch.store.fetch_literal(index)
    if blob is None:
        raise MissingOutputError(f"literal {branch.dag.keys[index]!r} is missing from Redis")
    label = f"literal {branch.dag.keys[index]!r} (key {branch.store.keys.literal(index)})"
    return branch.signer.loads(blob, LITERAL, index, label=label)


def fail_run(branch: Branch, index: int, exc: BaseException) -> None:
    """Record ``exc`` as the run's error (first one wins) and tell the client.

    The traceback keeps the task's own frames only (dask's ``admin.traceback.shorten``),
    and a note names the task's key, as the user knows it.
    """
    exc.__traceback__ = task_frames(exc.__traceback__)
    exc.add_note(f"(raised by task {branch.dag.keys[index]!r}, run on dask-serverless)")
    logger.info(
        "task %s failed: %r",
        branch.dag.keys[index],
        exc,
        extra={"run_id": branch.record.run_id},
    )
    branch.pending_events.append(events.error(index))
    batch = branch.take_events()
    assert batch is not None
    branch.store.fail(branch.signer.dumps_exception(exc), batch, len(branch.dag))


def finish_run(branch: Branch, inputs: dict[int, Any]) -> None:
    """At the sink: store the result, delete the run's intermediates, announce it."""
    dag = branch.dag
    result = tuple(inputs[i] for i in dag.requested)
    store = branch.store
    blob = branch.signer.dumps(result, RESULT)
    limit = branch.record.max_output_bytes
    if len(blob) > limit:
        names = ", ".join(repr(dag.keys[i]) for i in dag.requested[:5])
        raise OutputTooLargeError(
            f"the result ({names}) is {len(blob)} bytes, over the limit of {limit} bytes "
            "(serverless.max-output-bytes)"
        )
    branch.pending_events.append(events.finished())
    batch = branch.take_events()
    assert batch is not None
    if not store.finish(blob, batch, len(dag), branch.record.literals):
        return
    if branch.large_outputs is not None:
        branch.large_outputs.delete_run(branch.record.run_id)


class WorkerLogic:
    """The four stages of the branch loop, and the end of the run at the sink. Subclass and
    override a stage to optimise it."""

    def gather(self, branch: Branch, index: int) -> dict[int, Any]:
        """Inputs of ``index`` by parent index: held values first, then one MGET."""
        parents = branch.dag.dependencies[index]
        inputs = {p: branch.take_held(p) for p in parents if p in branch.values}
        remote = []
        for parent in parents:
            if parent in inputs:
                continue
            found, value = branch.cached(parent)
            if found:
                inputs[parent] = value
            else:
                remote.append(parent)
        for parent, blob in zip(remote, branch.store.fetch_outputs(remote), strict=True):
            if blob is None:
                raise MissingOutputError(
                    f"output of {branch.dag.keys[parent]!r} is missing from Redis"
                )
            inputs[parent] = branch.open_output(parent, blob)
            branch.remember(parent, inputs[parent])
        return inputs

    def execute(self, branch: Branch, index: int, inputs: dict[int, Any]) -> Any:
        dag = branch.dag
        node = load_literal(branch, index) if index in branch.record.literals else dag.nodes[index]
        assert node is not None
        return node({dag.keys[p]: value for p, value in inputs.items()})

    def publish(self, branch: Branch, index: int, value: Any, last_step: bool) -> list[int]:
        """Store the output if needed, count it in fan-in inboxes; return ready children.

        ``last_step``: nothing else is queued in this invocation, so unless this node
        makes a child ready here, the invocation's lease can be handed back now.
        """
        dag, internal = branch.dag, branch.record.internal
        ready: list[int] = []
        fan_in: list[tuple[int, int]] = []
        for child in dag.dependents[index]:
            count = len(dag.dependencies[child])
            if child in internal:
                if branch.count_local(child):
                    ready.append(child)
            elif count == 1:
                ready.append(child)
            else:
                fan_in.append((child, count))
        external_single = sum(1 for c in ready if c not in internal)
        spare = branch.spare_capacity()
        clustered = external_single > 1 and (
            (spare is not None and spare <= 0)
            or self.keep_together(branch, index, value)
            or self.keeps_local(branch)
        )
        if clustered:
            branch.clustered.add(index)
        leaves = output_leaves_worker(dag, index, internal, clustered)
        if not leaves:
            branch.unstored.add(index)
        if not leaves and not fan_in:
            branch.flush_if_due()
            return ready
        blob = branch.output_blob(index, value) if leaves else None
        if blob is not None:
            branch.remember(index, value)
        if blob is not None and len(blob) > branch.record.max_output_bytes:
            raise OutputTooLargeError(
                f"output of {dag.keys[index]!r} is {len(blob)} bytes, over the limit of "
                f"{branch.record.max_output_bytes} bytes (serverless.max-output-bytes)"
            )
        releasing = last_step and not ready
        reply = branch.store.complete(
            index,
            blob,
            fan_in,
            branch.take_events(),
            branch.invocation_id,
            releasing,
            pending=not last_step or bool(ready),
        )
        if reply is None:
            raise RunGone()
        load, won = reply
        branch.note_load(load)
        if releasing and not won:
            branch.lease_held = False
        return ready + won

    def split(self, branch: Branch, index: int, ready: list[int]) -> tuple[list[int], list[int]]:
        """(children to continue with here, children to hand to new workers).

        A bundle's internal children stay; of the others, the first continues here and
        the rest go to new workers, concurrently — as many as the platform has room for
        (``RunRecord.concurrency``); the remainder stays here too, to be handed on later
        should room appear (``share``). A child planned for another configuration always
        goes to a worker of that configuration.
        """
        internal = branch.record.internal
        here = [c for c in ready if c in internal]
        others = [c for c in ready if c not in internal]
        fitting = [c for c in others if branch.fits(c)]
        elsewhere = [c for c in others if not branch.fits(c)]
        if index in branch.clustered:
            return here + fitting, elsewhere
        spare = branch.spare_capacity()
        room = len(fitting) if spare is None else max(0, spare - len(elsewhere))
        return here + fitting[:1] + fitting[1 + room :], elsewhere + fitting[1 : 1 + room]

    def share(self, branch: Branch, stack: list[int]) -> list[int]:
        """Tasks from the bottom of ``stack`` to hand to new workers now that there is room.

        A worker that kept children because the platform was busy gives them away as
        soon as the run's load drops (learnt from its writes, or re-read every
        ``LOAD_CHECK_S`` while it has work queued). Bundle members stay: their internal
        children are counted in this invocation's memory.
        """
        if len(stack) < 2 or self.keeps_local(branch):
            return []
        if branch.record.concurrency is None:
            # Unknown concurrency: only a small run's children, kept while it was within
            # its budget, are handed on (all of them) once it is not.
            kept = branch.record.keep_local_s is not None
            return self.movable(branch, stack, len(stack)) if kept else []
        if self.fixed_bottom(branch, stack) >= len(stack) - 1:
            return []  # nothing queued could move: the load need not be read
        if time.monotonic() - branch.load_checked > LOAD_CHECK_S:
            branch.note_load(branch.store.load())
        return self.movable(branch, stack, branch.spare_capacity() or 0)

    def movable(self, branch: Branch, stack: list[int], spare: int) -> list[int]:
        """Up to ``spare`` tasks from the bottom of ``stack`` that may run elsewhere.

        The top of the stack is what this worker runs next; bundle members, tasks planned
        for another configuration and tasks that read a large output held here stay.
        """
        if spare <= 0:
            return []
        movable = (
            i
            for i in itertools.islice(stack, self.fixed_bottom(branch, stack), len(stack) - 1)
            if not stays_here(branch, i) and not self._needs_large_held(branch, i)
        )
        return list(itertools.islice(movable, spare))

    @staticmethod
    def fixed_bottom(branch: Branch, stack: Sequence[int]) -> int:
        """Entries at the bottom of ``stack`` that can never be handed on."""
        return fixed_bottom(stack, branch.fixed_bottom, functools.partial(stays_here, branch))

    @staticmethod
    def _needs_large_held(branch: Branch, index: int) -> bool:
        """Does ``index`` read an output held here that is too large to move cheaply?"""
        return any(
            p in branch.unstored
            and p in branch.values
            and branch.size_of(p, branch.values[p]) >= branch.record.cluster_output_bytes
            for p in branch.dag.dependencies[index]
        )

    def keeps_local(self, branch: Branch) -> bool:
        """Whether to run every ready child here: the run was planned as worth one
        invocation (``RunRecord.keep_local_s``) and this one is still within the task
        seconds that allows. A slower run than predicted hands on what is left (``share``)."""
        budget = branch.record.keep_local_s
        return budget is not None and time.monotonic() - branch.began <= budget

    def keep_together(self, branch: Branch, index: int, value: Any) -> bool:
        """Whether to run all of ``index``'s single-dependency children here.

        WUKONG's task clustering: moving a large output to many workers costs more than
        running its consumers where it already is.
        """
        return branch.size_of(index, value) >= branch.record.cluster_output_bytes

    def finish(self, branch: Branch, inputs: dict[int, Any]) -> None:
        """At the sink, with the requested values as ``inputs``: end the run
        (``finish_run``), the result stored for the client to read."""
        finish_run(branch, inputs)

    def hand_off_due(self, branch: Branch) -> bool:
        """Whether to hand the rest of the branch to a fresh invocation now.

        Asked after every task that leaves work here. By default: when the platform's time
        limit is near, so the worker is not killed mid-task (AWS Lambda stops an invocation
        at its timeout, 15 minutes at most).
        """
        return branch.time_is_short()
