"""Configuration defaults under dask's ``serverless`` namespace.

Registered the way dask's own sub-projects register theirs: the YAML next to this module
becomes the defaults, and ``dask.config`` layers user YAML files and ``DASK_SERVERLESS__…``
environment variables over it. Every setting a Scheduler takes as an argument falls back to
the value here, so code and configuration stay interchangeable.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "serverless.yaml")

with open(_DEFAULTS_FILE) as _file:
    dask.config.update_defaults(yaml.safe_load(_file))

SECRET_ENV = "DASK_SERVERLESS_SECRET"

# Tracebacks of failed tasks show the user's frames, not ours: this package joins the
# modules dask's ``shorten_traceback`` leaves out (``admin.traceback.shorten``), as
# distributed's do. A user who set the list keeps theirs.
ENGINE_FRAMES = r"dask_serverless[\\\/]"
_SHORTENED = dask.config.get("admin.traceback.shorten", None) or []
if ENGINE_FRAMES not in _SHORTENED:
    dask.config.update_defaults({"admin": {"traceback": {"shorten": [*_SHORTENED, ENGINE_FRAMES]}}})


def setting(name: str, value: Any = None) -> Any:
    """The explicit ``value`` when given, else ``serverless.<name>`` from dask.config."""
    if value is not None:
        return value
    return dask.config.get(f"serverless.{name}")


def secret_from_environment() -> bytes | None:
    """The shared signing secret from config or the environment, if any is set."""
    value = dask.config.get("serverless.secret", None) or os.environ.get(SECRET_ENV)
    return value.encode() if isinstance(value, str) else value
