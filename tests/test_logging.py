"""The client and the workers log what they do to ``dask_serverless`` loggers."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import dask
import pytest

from dask_serverless import Scheduler, logs
from tests.tasks import inc

_flaky_calls: dict[str, int] = {}


def fails_once(name: str) -> str:
    """Fails on its first call in a process (the inline backend runs it in ours)."""
    _flaky_calls[name] = _flaky_calls.get(name, 0) + 1
    if _flaky_calls[name] == 1:
        raise ConnectionError("a transient failure")
    return name


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    """The package's logger, restored afterwards (levels and handlers are process-wide)."""
    loggers = [logging.getLogger(name) for name in (logs.ROOT, logs.ROOT + ".client")]
    saved = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    yield loggers[0]
    for logger, (level, handlers, propagate) in zip(loggers, saved, strict=True):
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


def test_a_run_logs_its_start_plan_invocations_retries_and_end(redis_url, caplog):
    caplog.set_level(logging.DEBUG, logger=logs.ROOT)
    with Scheduler(redis=redis_url, backend="inline", timeout=60) as sched:
        value = dask.delayed(fails_once)("logged", dask_key_name="flaky")
        with dask.annotate(retries=2):
            assert dask.compute(value, scheduler=sched) == ("logged",)
    by_logger: dict[str, list[str]] = {}
    for record in caplog.records:
        by_logger.setdefault(record.name, []).append(record.getMessage())
    client = " | ".join(by_logger["dask_serverless.client.scheduler"])
    assert "started: 1 tasks, 1 invocations on the inline backend" in client
    assert "planner" in client
    assert "finished in" in client
    worker = " | ".join(by_logger["dask_serverless.worker.loop"])
    assert "task flaky failed (ConnectionError('a transient failure')); retry 1 of 2" in worker
    assert "invocation" in " | ".join(by_logger["dask_serverless.worker.handler"])
    assert "retry 1" in " | ".join(by_logger["dask_serverless.client.progress"])
    assert "invoking 1 workers" in " | ".join(by_logger["dask_serverless.client.run"])


def test_a_failed_run_is_logged(redis_url, caplog):
    caplog.set_level(logging.INFO, logger=logs.ROOT)
    with Scheduler(redis=redis_url, timeout=60) as sched, pytest.raises(TypeError):
        dask.compute(dask.delayed(inc)("one"), scheduler=sched)
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert any(r.name == "dask_serverless.client.scheduler" for r in failed)


def test_levels_come_from_dask_logging_config(package_logger):
    with dask.config.set({"logging": {"dask_serverless.client": "debug", "other": "error"}}):
        logs.configure()
    assert logging.getLogger("dask_serverless.client").level == logging.DEBUG
    assert logging.getLogger("other").level == logging.NOTSET  # not ours to configure


def test_workers_log_structured_json_lines(package_logger):
    stream = io.StringIO()
    logs.json_lines(logging.INFO, stream)
    logging.getLogger("dask_serverless.worker.loop").info(
        "task %s failed", "x", extra={"run_id": "r1"}
    )
    line = json.loads(stream.getvalue().strip())
    assert line["logger"] == "dask_serverless.worker.loop"
    assert line["message"] == "task x failed"
    assert line["run_id"] == "r1"
    assert line["level"] == "INFO"


LOGGING_SCRIPT = textwrap.dedent(
    """
    import dask
    import dask_serverless

    dask.config.set({"logging": {"dask_serverless": "debug"}})
    print(dask.compute(dask.delayed(sum)([1, 2]), scheduler=dask_serverless.get)[0])
    """
)


def test_dask_logging_config_reaches_local_instances(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "3"
    assert "dask_serverless.client.scheduler - INFO - run" in done.stderr
    assert "dask_serverless.worker.handler - DEBUG - invocation" in done.stderr
    assert "Traceback" not in done.stderr
