"""AWS Lambda: ``invoke`` (the backend the client and workers use to start workers),
``entry`` (the function's handler, which sets up the worker in an instance), ``leases``
(each invocation's lease renewed from a forked watcher), ``deploy``
(``dask-serverless lambda deploy``) and ``endpoint`` (a local stand-in for Lambda's API)."""

from dask_serverless.backends.aws_lambda.entry import handler, install, worker_environment
from dask_serverless.backends.aws_lambda.invoke import (
    DEFAULT_S3_THRESHOLD,
    ENV_DEFAULT_MEMORY,
    ENV_FUNCTION,
    ENV_HANDOFF_MARGIN,
    ENV_MEMORY_SIZES,
    ENV_REDIS_URL,
    ENV_REDIS_URL_ARN,
    ENV_S3_BUCKET,
    ENV_S3_THRESHOLD,
    ENV_SECRET,
    ENV_SECRET_ARN,
    HANDLER,
    LambdaBackend,
    LambdaSettings,
    PayloadTooLargeError,
    function_name,
    lambda_client,
    parse_function_name,
)

__all__ = [
    "DEFAULT_S3_THRESHOLD",
    "ENV_DEFAULT_MEMORY",
    "ENV_FUNCTION",
    "ENV_HANDOFF_MARGIN",
    "ENV_MEMORY_SIZES",
    "ENV_REDIS_URL",
    "ENV_REDIS_URL_ARN",
    "ENV_S3_BUCKET",
    "ENV_S3_THRESHOLD",
    "ENV_SECRET",
    "ENV_SECRET_ARN",
    "HANDLER",
    "LambdaBackend",
    "LambdaSettings",
    "PayloadTooLargeError",
    "function_name",
    "handler",
    "install",
    "lambda_client",
    "parse_function_name",
    "worker_environment",
]
