"""Logging: what the client and the workers say they do.

Every module logs to its own child of ``logging.getLogger("dask_serverless")``
(``dask_serverless.client.run``, ``dask_serverless.worker.loop`` …): the client says when
a run starts and ends, which plan it got and how many workers it invokes, when it recovers
lost work or rides out a Redis outage; the workers say which invocation they serve, which
task they retry or that failed. By default nothing is configured, so Python shows only
warnings (a recovered invocation, a lost instance).

It is configured through dask's ``logging`` config, as distributed's loggers are, in a
YAML file or with ``dask.config.set``::

    logging:
      dask_serverless: info
      dask_serverless.worker: debug

A level per logger name (a logger that has no handler, with none on the root logger
either, gets one on stderr), or a complete ``logging.config.dictConfig`` mapping (with
``version: 1``). ``configure()`` applies it; a Scheduler does so when it is created, and
passes the mapping to its local instances. On AWS Lambda, workers write one JSON object
per line (``json_lines()``), which CloudWatch Logs Insights queries by field.
"""

from __future__ import annotations

import json
import logging
import logging.config
import sys
import time
from collections.abc import Mapping
from typing import Any

import dask.config

ROOT = "dask_serverless"
_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
# Attributes every LogRecord has; anything else was passed as ``extra`` and goes to JSON.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def logging_config() -> dict[str, Any]:
    """The ``logging`` section of dask's config (empty when there is none)."""
    return dict(dask.config.get("logging", default={}) or {})


def configure(config: Mapping[str, Any] | None = None) -> None:
    """Apply ``config`` (default: dask's ``logging`` config) to the package's loggers."""
    config = logging_config() if config is None else dict(config)
    if not config:
        return
    if "version" in config:
        logging.config.dictConfig(config)
        return
    for name, level in config.items():
        if name != ROOT and not str(name).startswith(ROOT + "."):
            continue
        logger = logging.getLogger(name)
        logger.setLevel(str(level).upper())
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(handler)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=repr)


def json_lines(level: str | int = logging.INFO, stream: Any = None) -> logging.Handler:
    """Make the package's loggers write JSON lines to ``stream`` (stdout: Lambda's log).

    The package's records no longer propagate to the root logger, whose handler (Lambda's
    runtime installs one) would print them a second time as plain text.
    """
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h.formatter, JsonFormatter)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
