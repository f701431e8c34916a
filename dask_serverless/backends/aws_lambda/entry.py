"""The Lambda function's entry point: set up the worker in a Lambda instance and call it.

``handler(event, context)`` is what a deployed function runs
(``dask_serverless.backends.aws_lambda.entry.handler``). A Lambda instance serves many
invocations, so the first call builds the instance's ``WorkerEnvironment`` with
``worker_environment(os.environ)`` — the Redis URL and the signing secret from environment
variables or Secrets Manager (never from the payload, I-5), a ``LambdaBackend`` as the
invoker for fan-out, an S3 store for large outputs when a bucket is configured, the
margin before the time limit at which a worker hands its branch to a fresh invocation, and
a lease watcher forked for every invocation (``leases``: a task that holds the GIL cannot
stop its lease's renewal) — and keeps it in this module for the instance's later
invocations; it also makes the package's loggers write one JSON object per line
(``dask_serverless.logs``).
``dask-serverless lambda deploy`` sets exactly these variables, and the local endpoint
passes the same mapping to its instances (``install``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import boto3

from dask_serverless import logs
from dask_serverless.backends.aws_lambda.invoke import (
    DEFAULT_S3_THRESHOLD,
    ENV_HANDOFF_MARGIN,
    ENV_REDIS_URL,
    ENV_REDIS_URL_ARN,
    ENV_S3_BUCKET,
    ENV_S3_THRESHOLD,
    ENV_SECRET,
    ENV_SECRET_ARN,
    LambdaBackend,
    LambdaSettings,
    lambda_client,
)
from dask_serverless.backends.aws_lambda.leases import ForkedLeases
from dask_serverless.storage.s3 import S3OutputStore
from dask_serverless.worker.handler import WorkerEnvironment, handle


class _Instance:
    """The environment this Lambda instance keeps between invocations."""

    environment: WorkerEnvironment | None = None


def install(environment: WorkerEnvironment) -> None:
    """Use ``environment`` for this process's invocations (the local endpoint's instances)."""
    _Instance.environment = environment


def handler(event: dict, context: Any) -> dict:
    """Run one invocation; the first one in an instance builds its environment."""
    if _Instance.environment is None:
        # On Lambda the package logs one JSON object per line, at dask's configured level.
        logs.configure()
        logs.json_lines(logging.getLogger(logs.ROOT).level or logging.INFO)
        install(worker_environment(os.environ))
    assert _Instance.environment is not None
    return handle(_Instance.environment, event, context)


def _setting_or_secret(session: Any, variables: Mapping[str, str], name: str, arn: str) -> str:
    value = variables.get(name)
    if value:
        return value
    secret_arn = variables.get(arn)
    if secret_arn:
        client = session.client(
            "secretsmanager", endpoint_url=variables.get("AWS_ENDPOINT_URL_SECRETS_MANAGER")
        )
        return str(client.get_secret_value(SecretId=secret_arn)["SecretString"])
    raise RuntimeError(
        f"no worker environment installed in this process, and neither {name} nor {arn} "
        "is set (deploy the function with `dask-serverless lambda deploy`)"
    )


def worker_environment(variables: Mapping[str, str]) -> WorkerEnvironment:
    """The ``WorkerEnvironment`` of a Lambda instance, from its environment ``variables``.

    Called once per instance (``os.environ`` on Lambda; the local endpoint passes its own
    mapping). AWS credentials, region and endpoints come from the same mapping, so the
    fan-out invoker uses the instance's execution role.
    """
    logs.configure()
    session = boto3.session.Session(
        aws_access_key_id=variables.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=variables.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=variables.get("AWS_SESSION_TOKEN"),
        region_name=variables.get("AWS_REGION") or variables.get("AWS_DEFAULT_REGION"),
    )
    redis_url = _setting_or_secret(session, variables, ENV_REDIS_URL, ENV_REDIS_URL_ARN)
    secret = _setting_or_secret(session, variables, ENV_SECRET, ENV_SECRET_ARN)
    settings = LambdaSettings.from_environment(variables)
    invoker = LambdaBackend(settings, lambda_client(settings, session))
    large_outputs = None
    bucket = variables.get(ENV_S3_BUCKET)
    if bucket:
        s3 = session.client("s3", endpoint_url=variables.get("AWS_ENDPOINT_URL_S3"))
        threshold = int(variables.get(ENV_S3_THRESHOLD) or DEFAULT_S3_THRESHOLD)
        large_outputs = S3OutputStore(s3, bucket, threshold)
    stream = variables.get("AWS_LAMBDA_LOG_STREAM_NAME")
    worker_id = f"{variables.get('AWS_LAMBDA_FUNCTION_NAME')}:{stream}" if stream else None
    return WorkerEnvironment(
        redis_url,
        secret.encode(),
        invoker,
        worker_id=worker_id,
        large_outputs=large_outputs,
        handoff_margin_ms=int(variables.get(ENV_HANDOFF_MARGIN) or 0),
        leases=ForkedLeases(redis_url),
    )
