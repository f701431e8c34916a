"""A local endpoint that speaks AWS Lambda's Invoke API, backed by the local pool.

It lets the AWS Lambda backend run end to end without an AWS account: boto3, pointed at it
(``endpoint_url=…`` or boto3's own ``AWS_ENDPOINT_URL_LAMBDA``), sends the very requests
it would send to AWS, and gets the answers AWS would give:

* ``POST /2015-03-31/functions/{name}/invocations`` with ``X-Amz-Invocation-Type``:
  ``Event`` queues the invocation and answers 202; ``RequestResponse`` (the default) runs
  the handler and answers 200 with its JSON (or ``X-Amz-Function-Error: Unhandled`` and the
  error document when it raised); ``DryRun`` answers 204.
* any function name that follows the deploy naming (``<base>-<memory MB>``) exists; others
  get 404 ``ResourceNotFoundException``. An ``Event`` payload over the asynchronous limit
  gets 413 ``RequestTooLargeException``.
* forced throttling — the first ``throttle_first`` requests, and every ``throttle_every``-th
  one — gets 429 ``TooManyRequestsException`` with the headers and body boto3 parses, so
  tests can show that every invoker retries.

Each function name gets its own ``LocalBackend`` (instances of the function's memory size).
Its instances build their ``WorkerEnvironment`` with ``aws_lambda.worker_environment`` from
the same variables ``dask-serverless lambda deploy`` gives a real function, with this
endpoint as their Lambda endpoint: a worker's fan-out goes through boto3 and HTTP again,
exactly as on AWS. ``RequestResponse`` invocations run in a small process pool of their own
built the same way.

Standard library only (``http.server``); it listens on 127.0.0.1 and checks no signature:
it is a test double, not a server to expose.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import re
import secrets
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from dask_serverless.backends import aws_lambda
from dask_serverless.backends.aws_lambda import entry
from dask_serverless.backends.local import LocalBackend, LocalContext
from dask_serverless.constants import DEFAULT_MEMORY_MB, MEMORY_SIZES_MB
from dask_serverless.protocol.invocation import InvalidInvocationError, Invocation

_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")
_SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024


def _install_worker(variables: Mapping[str, str]) -> None:
    """Initializer of a RequestResponse process: the same bootstrap as a Lambda instance."""
    entry.install(entry.worker_environment(variables))


def _run_request_response(
    payload: dict, function: str, memory_mb: int, timeout_ms: int
) -> tuple[bool, Any]:
    """Run the handler once; ``(True, result)`` or ``(False, Lambda's error document)``."""
    context = LocalContext(
        function_name=function,
        memory_limit_in_mb=memory_mb,
        aws_request_id=secrets.token_hex(8),
        deadline=time.monotonic() + timeout_ms / 1000,
        cold_start=False,
    )
    try:
        return True, entry.handler(payload, context)
    except Exception as exc:
        return False, {
            "errorMessage": str(exc),
            "errorType": type(exc).__name__,
            "stackTrace": traceback.format_tb(exc.__traceback__),
        }


class LambdaEndpoint:
    """See the module docstring. Use as a context manager, or ``start()`` and ``close()``.

    ``variables`` are the worker functions' environment variables (Redis URL, secret, S3
    bucket …, as ``lambda deploy`` would set them); the endpoint adds the function name,
    its memory sizes, its own URL as the Lambda endpoint and dummy AWS credentials.
    """

    def __init__(
        self,
        variables: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        memory_sizes: tuple[int, ...] = MEMORY_SIZES_MB,
        default_memory: int = DEFAULT_MEMORY_MB,
        concurrency: int | None = None,
        keep_alive_s: float = 60.0,
        invocation_timeout_ms: int = 900_000,
        max_event_payload_bytes: int = 1024 * 1024,
        throttle_first: int = 0,
        throttle_every: int = 0,
    ) -> None:
        self.variables = dict(variables)
        self.memory_sizes = tuple(memory_sizes)
        self.default_memory = int(default_memory)
        self.concurrency = concurrency
        self.keep_alive_s = keep_alive_s
        self.invocation_timeout_ms = int(invocation_timeout_ms)
        self.max_event_payload_bytes = int(max_event_payload_bytes)
        self.invocations: Counter[str] = Counter()
        self.throttled = 0
        self._lock = threading.Lock()
        self._requests = 0
        self._throttle_base = 0
        self._throttle_first = 0
        self._throttle_every = 0
        self.set_throttling(throttle_first, throttle_every)
        self._backends: dict[str, LocalBackend] = {}
        self._sync_pools: dict[str, concurrent.futures.ProcessPoolExecutor] = {}
        self._server = _Server((host, port), _InvokeHandler)
        self._server.endpoint = self
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LambdaEndpoint:
        """Serve requests in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dask-serverless-lambda-endpoint", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve requests in this thread until ``close`` (or KeyboardInterrupt)."""
        self._server.serve_forever()

    def set_throttling(self, first: int = 0, every: int = 0) -> None:
        """From now on, answer 429 to the first ``first`` requests and to every
        ``every``-th one; ``set_throttling()`` stops throttling."""
        with self._lock:
            self._throttle_base = self._requests
            self._throttle_first = int(first)
            self._throttle_every = int(every)

    def total_invocations(self) -> int:
        return sum(self.invocations.values())

    # -- what a request does -------------------------------------------------------------

    def should_throttle(self) -> bool:
        with self._lock:
            self._requests += 1
            n = self._requests - self._throttle_base
            throttle = n <= self._throttle_first or (
                self._throttle_every > 0 and n % self._throttle_every == 0
            )
            if throttle:
                self.throttled += 1
            return throttle

    def function_variables(self, base: str) -> dict[str, str]:
        """The environment of the functions ``<base>-<MB>``, as deploy would set it."""
        return {
            "AWS_ACCESS_KEY_ID": "local-endpoint",
            "AWS_SECRET_ACCESS_KEY": "local-endpoint",
            "AWS_REGION": "us-east-1",
            **self.variables,
            aws_lambda.ENV_FUNCTION: base,
            aws_lambda.ENV_MEMORY_SIZES: ",".join(str(m) for m in self.memory_sizes),
            aws_lambda.ENV_DEFAULT_MEMORY: str(self.default_memory),
            "AWS_ENDPOINT_URL_LAMBDA": self.url,
        }

    def invoke_event(self, function: str, payload: dict) -> None:
        base, memory = _parse(function)
        warm_up = bool(payload.get("warm"))
        invocation = None
        if not warm_up:
            try:
                invocation = Invocation.from_payload(payload)
            except InvalidInvocationError:
                # Lambda accepts any asynchronous payload and the function fails on it.
                traceback.print_exc(file=sys.stderr)
                return
        with self._lock:
            if self._closed:
                raise RuntimeError("the endpoint is closed")
            backend = self._backends.get(function)
            if backend is None:
                # Its instances build their environment from the variables, so the URL and
                # secret LocalBackend would hand them are not used.
                backend = LocalBackend(
                    "",
                    b"-",
                    concurrency=self.concurrency,
                    keep_alive_s=self.keep_alive_s,
                    invocation_timeout_ms=self.invocation_timeout_ms,
                    memory_mb=memory,
                    worker_environment=functools.partial(
                        aws_lambda.worker_environment, self.function_variables(base)
                    ),
                )
                self._backends[function] = backend
            self.invocations[function] += 1
        if invocation is None:
            # A warm-up invocation (pre-warming) only starts an instance.
            backend.prewarm({memory: 1})
        else:
            backend.invoke([invocation])

    def invoke_request_response(self, function: str, payload: dict) -> tuple[bool, Any]:
        base, memory = _parse(function)
        with self._lock:
            if self._closed:
                raise RuntimeError("the endpoint is closed")
            pool = self._sync_pools.get(function)
            if pool is None:
                pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("forkserver"),
                    initializer=_install_worker,
                    initargs=(self.function_variables(base),),
                )
                self._sync_pools[function] = pool
            self.invocations[function] += 1
        future = pool.submit(
            _run_request_response, payload, function, memory, self.invocation_timeout_ms
        )
        return future.result()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            backends = list(self._backends.values())
            pools = list(self._sync_pools.values())
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        for backend in backends:
            backend.close()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LambdaEndpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse(function: str) -> tuple[str, int]:
    parsed = aws_lambda.parse_function_name(function)
    assert parsed is not None, function
    return parsed


class _Server(ThreadingHTTPServer):
    endpoint: LambdaEndpoint


class _InvokeHandler(BaseHTTPRequestHandler):
    """One HTTP request to the endpoint (a thread per connection)."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "dask-serverless-lambda-endpoint"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a run sends many requests."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        match = _INVOKE_PATH.match(urlsplit(self.path).path)
        if match is None:
            self._error(404, "UnknownOperationException", "only Invoke is implemented here")
            return
        function = unquote(match["name"])
        if function.startswith("arn:"):
            function = function.split(":")[6] if function.count(":") >= 6 else ""
        if aws_lambda.parse_function_name(function) is None:
            self._error(
                404,
                "ResourceNotFoundException",
                f"Function not found: {function} (names look like <base>-<memory MB>)",
            )
            return
        endpoint = self.server.endpoint
        if endpoint.should_throttle():
            self._throttled()
            return
        kind = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        limit = endpoint.max_event_payload_bytes if kind == "Event" else _SYNC_PAYLOAD_LIMIT
        if len(body) > limit:
            self._error(
                413,
                "RequestTooLargeException",
                f"Request must be smaller than {limit} bytes for the {kind} invocation type",
            )
            return
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            self._error(400, "InvalidRequestContentException", "Could not parse request body")
            return
        if kind == "DryRun":
            self._reply(204, b"")
        elif kind == "Event":
            endpoint.invoke_event(function, payload)
            self._reply(202, b"")
        elif kind == "RequestResponse":
            ok, result = endpoint.invoke_request_response(function, payload)
            headers = {"X-Amz-Executed-Version": "$LATEST"}
            if not ok:
                headers["X-Amz-Function-Error"] = "Unhandled"
            self._reply(200, json.dumps(result).encode(), headers)
        else:
            self._error(400, "InvalidParameterValueException", f"bad invocation type {kind}")

    def _throttled(self) -> None:
        body = {
            "Reason": "CallerRateLimitExceeded",
            "Type": "User",
            "message": "Rate Exceeded.",
        }
        self._error(429, "TooManyRequestsException", body=body, headers={"Retry-After": "1"})

    def _error(
        self,
        status: int,
        code: str,
        message: str = "",
        body: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        document = body if body is not None else {"Type": "User", "message": message}
        self._reply(
            status,
            json.dumps(document).encode(),
            {"x-amzn-ErrorType": code, **(headers or {})},
        )

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("x-amzn-RequestId", secrets.token_hex(16))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
