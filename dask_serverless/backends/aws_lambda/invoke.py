"""AWS Lambda: invoke workers through boto3.

The other half, starting a worker inside a Lambda instance, is ``entry``; the names and
settings both halves agree on live here.

**Invoking** (the client's roots and every worker's fan-out): ``LambdaBackend.invoke``
sends ``InvocationType="Event"`` requests — Lambda queues them and answers 202 at once,
the same fire-and-forget model as the local pool. A fan-out of many children is sent from
a thread pool over one boto3 client whose connection pool is as large as that pool, and
whose retry mode (``adaptive`` by default) retries throttled calls (HTTP 429,
``TooManyRequestsException``) with backoff. A payload is small JSON (the run record is
fetched from Redis by key); one over ``max-payload-bytes`` is refused before anything is
sent, because Lambda would refuse it anyway (``RequestTooLargeException``).

**Functions.** One Lambda function per memory size, named ``<function>-<MB>``
(``dsl-worker-1769``). A payload that carries ``"memory": MB`` goes to the smallest
deployed size that is at least that; a payload without it to ``default-memory``. Separate
functions rather than aliases of one function: an alias points at a published version, so
every change would mean publishing and re-pointing one version per size, while separate
functions are updated independently and show their own metrics, logs and concurrency.

**Starting a worker** (``entry``). The function's handler,
``dask_serverless.backends.aws_lambda.entry.handler``, builds the instance's
``WorkerEnvironment`` on its first call with ``worker_environment(os.environ)``: the
Redis URL and the signing secret from environment variables or Secrets Manager (never from
the payload, I-5), a ``LambdaBackend`` as the invoker for fan-out, an S3 store for large
outputs when a bucket is configured, and the margin before the time limit at which a
worker hands its branch to a fresh invocation.
``dask-serverless lambda deploy`` (``deploy``) sets exactly these variables, and the
local endpoint (``endpoint``) passes the same mapping to its instances.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config

from dask_serverless import config
from dask_serverless.constants import DEFAULT_MEMORY_MB, MEMORY_SIZES_MB
from dask_serverless.protocol.invocation import Invocation

# Environment variables of a deployed worker function (set by `lambda deploy`).
ENV_REDIS_URL = "DASK_SERVERLESS_REDIS_URL"
ENV_REDIS_URL_ARN = "DASK_SERVERLESS_REDIS_URL_SECRET_ARN"
ENV_SECRET = config.SECRET_ENV
ENV_SECRET_ARN = "DASK_SERVERLESS_SECRET_ARN"
ENV_FUNCTION = "DASK_SERVERLESS_LAMBDA_FUNCTION"
ENV_MEMORY_SIZES = "DASK_SERVERLESS_LAMBDA_MEMORY_SIZES"
ENV_DEFAULT_MEMORY = "DASK_SERVERLESS_LAMBDA_DEFAULT_MEMORY"
ENV_S3_BUCKET = "DASK_SERVERLESS_S3_BUCKET"
ENV_S3_THRESHOLD = "DASK_SERVERLESS_S3_THRESHOLD_BYTES"
ENV_HANDOFF_MARGIN = "DASK_SERVERLESS_HANDOFF_MARGIN_MS"
# The region a client of a stand-in Lambda endpoint names when none is configured: the
# stand-in serves every region alike, and boto3 refuses to build a client without one.
STAND_IN_REGION = "us-east-1"

HANDLER = "dask_serverless.backends.aws_lambda.entry.handler"
DEFAULT_S3_THRESHOLD = 1024 * 1024
_FUNCTION_NAME = re.compile(r"^(?P<base>[A-Za-z0-9_-]+)-(?P<memory>[0-9]+)$")


class PayloadTooLargeError(ValueError):
    """An invocation payload is over the configured asynchronous payload limit."""


def function_name(base: str, memory_mb: int) -> str:
    """The name of the worker function of memory size ``memory_mb``."""
    return f"{base}-{int(memory_mb)}"


def parse_function_name(name: str) -> tuple[str, int] | None:
    """``(base, memory_mb)`` of a name that follows the deploy naming, else None.

    Accepts a function ARN too (``arn:aws:lambda:…:function:dsl-worker-1769``).
    """
    if name.startswith("arn:"):
        parts = name.split(":")
        name = parts[6] if len(parts) > 6 else ""
    match = _FUNCTION_NAME.match(name)
    if match is None:
        return None
    return match["base"], int(match["memory"])


@dataclass(frozen=True)
class LambdaSettings:
    """How to reach the worker functions; see ``serverless.lambda`` in serverless.yaml."""

    function: str
    memory_sizes: tuple[int, ...] = MEMORY_SIZES_MB
    default_memory: int = DEFAULT_MEMORY_MB
    region: str | None = None
    endpoint_url: str | None = None
    max_payload_bytes: int = 1024 * 1024
    invoke_threads: int = 32
    max_pool_connections: int = 64
    retry_mode: str = "adaptive"
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if not self.function or parse_function_name(function_name(self.function, 1)) is None:
            raise ValueError(
                f"invalid Lambda function base name {self.function!r}: use letters, digits, "
                "'-' and '_' (the functions are named <name>-<memory MB>)"
            )
        if not self.memory_sizes:
            raise ValueError("memory_sizes must name at least one memory size")
        if self.default_memory not in self.memory_sizes:
            raise ValueError(
                f"default memory {self.default_memory} MB is not one of the deployed sizes "
                f"{list(self.memory_sizes)}"
            )

    @classmethod
    def from_config(cls, overrides: Mapping[str, Any] | None = None) -> LambdaSettings:
        """Settings from ``overrides`` (keys as in serverless.yaml), else dask.config."""
        overrides = overrides or {}

        def get(name: str) -> Any:
            return config.setting(f"lambda.{name}", overrides.get(name))

        function = get("function")
        if not function:
            raise ValueError(
                "the lambda backend needs the deployed function's name: "
                "Scheduler(lambda_function=...) or the serverless.lambda.function setting "
                "(the --name given to `dask-serverless lambda deploy`)"
            )
        return cls(
            function=str(function),
            memory_sizes=tuple(sorted(int(m) for m in get("memory-sizes"))),
            default_memory=int(get("default-memory")),
            region=get("region"),
            endpoint_url=get("endpoint-url"),
            max_payload_bytes=int(get("max-payload-bytes")),
            invoke_threads=int(get("invoke-threads")),
            max_pool_connections=int(get("max-pool-connections")),
            retry_mode=str(get("retry-mode")),
            max_attempts=int(get("max-attempts")),
        )

    @classmethod
    def from_environment(cls, variables: Mapping[str, str]) -> LambdaSettings:
        """A worker's settings: names and sizes from the variables deploy set."""
        sizes = variables.get(ENV_MEMORY_SIZES)
        return cls.from_config(
            {
                "function": variables.get(ENV_FUNCTION),
                "memory-sizes": [int(m) for m in sizes.split(",")] if sizes else None,
                "default-memory": variables.get(ENV_DEFAULT_MEMORY),
                "region": variables.get("AWS_REGION") or variables.get("AWS_DEFAULT_REGION"),
                "endpoint-url": variables.get("AWS_ENDPOINT_URL_LAMBDA"),
            }
        )

    def function_for(self, memory_mb: int | None) -> str:
        """The function for an invocation asking for ``memory_mb`` (None: the default).

        The smallest deployed size that is at least ``memory_mb``: an invocation never gets
        less memory than its plan asked for.
        """
        if memory_mb is None:
            return function_name(self.function, self.default_memory)
        for size in sorted(self.memory_sizes):
            if size >= int(memory_mb):
                return function_name(self.function, size)
        raise ValueError(
            f"an invocation asks for {memory_mb} MB, more than the largest deployed "
            f"function ({max(self.memory_sizes)} MB); deploy that size with "
            "`dask-serverless lambda deploy --memory …`"
        )


def lambda_client(settings: LambdaSettings, session: Any = None, read_timeout: int = 60) -> Any:
    """A boto3 Lambda client tuned for many concurrent ``Invoke`` calls.

    Against a stand-in endpoint (``endpoint_url``, e.g. ``dask-serverless lambda
    serve-local``) no AWS account is needed: without a configured region the client uses
    ``STAND_IN_REGION``, and without credentials it sends unsigned requests, which the
    stand-in accepts. Against AWS itself both stay boto3's to find.
    """
    session = session or boto3.session.Session()
    stand_in = settings.endpoint_url is not None
    region = settings.region or session.region_name or (STAND_IN_REGION if stand_in else None)
    unsigned = stand_in and session.get_credentials() is None
    tuned = Config(
        max_pool_connections=settings.max_pool_connections,
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        connect_timeout=10,
        read_timeout=read_timeout,
        **({"signature_version": UNSIGNED} if unsigned else {}),
    )
    return session.client(
        "lambda", region_name=region, endpoint_url=settings.endpoint_url, config=tuned
    )


class LambdaBackend:
    """Fire-and-forget ``Invoke`` of the worker functions, for a client or a worker.

    Thread-safe. ``invoke`` returns when Lambda accepted every payload (HTTP 202) and
    raises the first error otherwise (after boto3's retries); it checks every payload's
    size and function before it sends any.
    """

    name = "lambda"
    # Lambda scales out: no known concurrency, no CPU throttling to report, and a failed
    # Invoke raises in the caller rather than stopping the platform.
    concurrency: int | None = None
    throttled: bool | None = None
    failure: BaseException | None = None

    def __init__(self, settings: LambdaSettings, client: Any = None) -> None:
        self.settings = settings
        self._client = client if client is not None else lambda_client(settings)
        self._pool = ThreadPoolExecutor(
            max_workers=settings.invoke_threads, thread_name_prefix="dask-serverless-invoke"
        )
        self._closed = False

    def invoke(self, invocations: Sequence[Invocation]) -> None:
        if self._closed:
            raise RuntimeError("the lambda backend is closed")
        requests = [self._request(invocation) for invocation in invocations]
        if len(requests) == 1:
            self._send(*requests[0])
            return
        for _ in self._pool.map(lambda request: self._send(*request), requests):
            pass

    def warm_instances(self) -> Mapping[int, int]:
        """Unknown: Lambda does not say which instances are warm."""
        return {}

    def prewarm(self, counts: Mapping[int, int]) -> None:
        """Warm-up invocations (``{"warm": 1}``, answered at once by the handler): per
        configuration, ``counts[MB]`` instances start their cold start now, ahead of the
        invocations the plan expects of them."""
        body = json.dumps({"warm": 1}).encode()
        requests = [
            (self.settings.function_for(int(mb)), body)
            for mb, count in counts.items()
            for _ in range(count)
        ]
        for _ in self._pool.map(lambda request: self._send(*request), requests):
            pass

    def _request(self, invocation: Invocation) -> tuple[str, bytes]:
        body = json.dumps(invocation.to_payload(), separators=(",", ":")).encode()
        if len(body) > self.settings.max_payload_bytes:
            raise PayloadTooLargeError(
                f"an invocation payload of {len(body)} bytes is over the asynchronous "
                f"payload limit of {self.settings.max_payload_bytes} bytes "
                "(serverless.lambda.max-payload-bytes)"
            )
        return self.settings.function_for(invocation.memory_mb), body

    def _send(self, function: str, body: bytes) -> None:
        response = self._client.invoke(FunctionName=function, InvocationType="Event", Payload=body)
        if response.get("StatusCode") != 202:
            raise RuntimeError(
                f"Lambda did not accept an invocation of {function}: "
                f"HTTP {response.get('StatusCode')}"
            )

    def take_crashes(self, run_id: str) -> dict[str, str]:
        """Lambda does not tell an asynchronous caller that an instance died; the run's
        leases do."""
        return {}

    def cancel(self, run_id: str) -> None:
        """Lambda cannot stop a running invocation: its worker sees the run gone at its
        next lease renewal and stops before its next task."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
