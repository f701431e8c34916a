"""What a Scheduler is set to: its arguments over ``dask.config``, read at every compute.

A Scheduler keeps the arguments it was given; whatever it was not given comes from
``dask.config``'s ``serverless`` settings, read again at every compute, as dask reads its
own configuration when a compute starts. ``resolve`` turns both into a ``Settings``,
checking every value with an error that names it — as the argument it was passed as, or
as the setting it came from.

A ``Settings`` has two parts. ``resources`` are what the Scheduler starts: its Redis (an
embedded server or a URL), its backend and the backend's options, the secret, the
dashboard; when they change, the Scheduler stops what it started and starts it again
before the next compute. ``runs`` (timeouts, retries, planning, client tasks, …) only
shape the runs, and apply to the next compute as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dask.config

from dask_serverless.config import secret_from_environment

BACKEND_NAMES = ("local", "inline", "lambda")

# Scheduler argument → the setting under ``serverless.`` it overrides.
SETTING_OF = {
    "redis": "redis",
    "backend": "backend",
    "timeout": "timeout",
    "run_ttl": "run-ttl",
    "concurrency": "local.concurrency",
    "keep_alive": "local.keep-alive",
    "retries": "retries",
    "retry_backoff": "retry-backoff",
    "lease_timeout": "lease-timeout",
    "max_reinvocations": "max-reinvocations",
    "max_output_bytes": "max-output-bytes",
    "lambda_function": "lambda.function",
    "lambda_endpoint_url": "lambda.endpoint-url",
    "lambda_region": "lambda.region",
    "planner": "planning.planner",
    "sla": "planning.sla",
    "deadline": "planning.deadline",
    "memory_configs": "planning.memory-configs",
    "history": "planning.history",
    "dashboard": "dashboard.enabled",
    "client_tasks": "planning.client-tasks",
}


@dataclass(frozen=True)
class Resources:
    """What a Scheduler starts; a change restarts it (see the module docstring)."""

    redis: str | None
    redis_cluster: Any
    embedded_server: str | None
    backend: Any
    # The secret given or configured; None: the Scheduler's own random one.
    secret: bytes | None
    local: Mapping[str, Any] = field(hash=False)
    lambda_options: Mapping[str, Any] = field(hash=False)
    dashboard: bool = False
    dashboard_port: int = 0


@dataclass(frozen=True)
class RunSettings:
    """What shapes the runs; applied to the next compute as it is."""

    timeout: float | None
    run_ttl: int
    retries: int
    retry_backoff_s: float
    lease_ms: int
    max_output_bytes: int
    max_reinvocations: int
    cluster_output_bytes: int
    client_tasks: bool
    # Planning(...) keyword arguments, and the run history's length and lifetime.
    planning: Mapping[str, Any] = field(hash=False)
    history_runs: int = 0


@dataclass(frozen=True)
class Settings:
    resources: Resources
    runs: RunSettings


class _Reader:
    """Reads each setting as its argument, else from ``dask.config``, naming its source."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self.arguments = arguments
        self.config = dask.config.get("serverless")

    def setting(self, path: str) -> Any:
        """``serverless.<path>`` from dask.config (read once per ``resolve``)."""
        value = self.config
        for part in path.split("."):
            value = value[part]
        return value

    def value(self, name: str) -> Any:
        given = self.arguments.get(name)
        return given if given is not None else self.setting(SETTING_OF[name])

    def label(self, name: str, value: Any) -> str:
        if self.arguments.get(name) is not None:
            return f"Scheduler({name}={value!r})"
        return f"dask config serverless.{SETTING_OF[name]}={value!r}"

    def number(
        self,
        name: str,
        minimum: float,
        *,
        whole: bool = False,
        optional: bool = False,
        above: bool = False,
        value: Any = None,
    ) -> Any:
        """The setting ``name`` when it is a number >= ``minimum`` (> with ``above``),
        else a ValueError naming it; ``None`` passes when ``optional``."""
        if value is None:
            value = self.value(name)
        return checked_number(
            self.label(name, value),
            name,
            value,
            minimum,
            whole=whole,
            optional=optional,
            above=above,
        )


def checked_number(
    label: str,
    name: str,
    value: Any,
    minimum: float,
    *,
    whole: bool = False,
    optional: bool = False,
    above: bool = False,
) -> Any:
    """``value`` when it is a number >= ``minimum`` (> with ``above``), else a ValueError
    that starts with ``label`` (where the value came from); ``None`` passes when
    ``optional``."""
    if value is None and optional:
        return None
    kind = "whole number" if whole else "number"
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if valid and whole:
        valid = float(value).is_integer()
    if valid:
        valid = value > minimum if above else value >= minimum
    if not valid:
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        allowed = " or None" if optional else ""
        raise ValueError(f"{label}: {name} must be a {kind} {bound}{allowed}")
    return int(value) if whole else value


def resolve(arguments: Mapping[str, Any]) -> Settings:
    """The settings of a Scheduler given ``arguments`` (None: not given), checked."""
    read = _Reader(arguments)
    backend = read.value("backend")
    if isinstance(backend, str) and backend not in BACKEND_NAMES:
        raise ValueError(
            f"{read.label('backend', backend)}: backend must be one of "
            f"{', '.join(map(repr, BACKEND_NAMES))} or a Backend object"
        )
    secret = arguments.get("secret")
    if secret is not None and not isinstance(secret, (bytes, str)):
        raise TypeError(
            f"Scheduler(secret=…): secret must be bytes or str, not {type(secret).__name__}"
        )
    memory_configs = read.value("memory_configs")
    for value in memory_configs or ():
        checked_number(
            read.label("memory_configs", memory_configs),
            "memory_configs",
            value,
            0,
            whole=True,
            above=True,
        )
    local = dict(read.setting("local"))
    local["concurrency"] = read.number("concurrency", 1, whole=True, optional=True)
    local["keep-alive"] = read.number("keep_alive", 0)
    lambda_options = {
        "function": arguments.get("lambda_function"),
        "endpoint-url": arguments.get("lambda_endpoint_url"),
        "region": arguments.get("lambda_region"),
    }
    dashboard = arguments.get("dashboard")
    resources = Resources(
        redis=read.value("redis"),
        redis_cluster=read.config.get("redis-cluster", "auto"),
        embedded_server=read.setting("embedded.server"),
        backend=backend,
        secret=(secret.encode() if isinstance(secret, str) else secret)
        or secret_from_environment(),
        local=local,
        lambda_options={
            **read.setting("lambda"),
            **{name: value for name, value in lambda_options.items() if value is not None},
        },
        dashboard=bool(dashboard or (dashboard is None and read.value("dashboard"))),
        dashboard_port=int(read.setting("dashboard.port")),
    )
    runs = RunSettings(
        timeout=read.number("timeout", 0, optional=True, above=True),
        run_ttl=read.number("run_ttl", 1, whole=True),
        retries=read.number("retries", 0, whole=True),
        retry_backoff_s=float(read.number("retry_backoff", 0)),
        lease_ms=int(float(read.number("lease_timeout", 0, above=True)) * 1000),
        max_output_bytes=read.number("max_output_bytes", 1, whole=True),
        max_reinvocations=read.number("max_reinvocations", 0, whole=True),
        cluster_output_bytes=int(read.setting("cluster-output-bytes")),
        client_tasks=bool(read.value("client_tasks")),
        planning={
            "planner": read.value("planner"),
            "sla": read.value("sla"),
            "deadline": read.value("deadline"),
            "memory_configs": memory_configs,
            "history": bool(read.value("history")),
            "history_samples": int(read.setting("planning.history-samples")),
            "history_ttl_s": int(read.setting("planning.history-ttl")),
            "min_work_s": float(read.setting("planning.min-work")),
            "pricing": read.setting("planning.pricing"),
        },
        history_runs=int(read.setting("history.runs")),
    )
    return Settings(resources, runs)
