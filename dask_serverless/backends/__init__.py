"""How workers are started. Nothing outside this package knows."""

from __future__ import annotations

from typing import Any

from dask_serverless.backends.base import Backend


def create_backend(
    backend: str | Backend, redis_url: str, secret: bytes, options: dict[str, Any]
) -> Backend:
    """The backend named ``backend`` (or ``backend`` itself when it is one already)."""
    if not isinstance(backend, str):
        return backend
    if backend == "local":
        from dask_serverless.backends.local import LocalBackend

        return LocalBackend(
            redis_url,
            secret,
            concurrency=options.get("concurrency"),
            keep_alive_s=options["keep-alive"],
            invocation_timeout_ms=options["invocation-timeout-ms"],
        )
    if backend == "inline":
        from dask_serverless.backends.inline import InlineBackend

        return InlineBackend(redis_url, secret, concurrency=options.get("concurrency") or 1)
    if backend == "lambda":
        from dask_serverless.backends.aws_lambda import LambdaBackend, LambdaSettings

        return LambdaBackend(LambdaSettings.from_config(options.get("lambda")))
    raise ValueError(f"unknown backend {backend!r}; available: 'local', 'inline', 'lambda'")
