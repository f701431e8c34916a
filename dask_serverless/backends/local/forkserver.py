"""Where local instances come from: a fork server that never sees the user's main module.

A FaaS platform starts its workers from the function's code, never from the caller's
program, and our workers need nothing from it (functions defined in ``__main__`` travel by
value, with cloudpickle). So instances are not started with ``multiprocessing``, whose
children import the main module again (a script without ``if __name__ == "__main__":``,
``python -``, ``python -c``, a notebook all break on that). Instead, the first local
backend of a process starts ``python -m dask_serverless.backends.local``: a fresh
interpreter that imports the worker and the scientific stack the client has loaded
(numpy, pandas, dask.array …) once, and then forks one instance per request. A cold start
costs a ``fork``; an instance never imports dask again, and its garbage collector
never walks what it inherited (``gc.freeze`` before every fork).

The protocol runs over one Unix socket pair, the *control* connection:

1. The client starts the server with the number of its end of the socket in argv (a file
   descriptor, no secret) and sends ``(sys.path, cwd, modules)``: the server imports from
   where the client imports and preloads ``modules``.
2. Per instance the client sends ``(FORK, sys.path, cwd, modules)`` and then, with
   SCM_RIGHTS, the instance's descriptors: its own end of a pipe to the dispatcher, and
   the shared memory of its task slot when it has one. The server imports the modules it
   lacks, forks, answers with the child's pid and closes its copies; the child runs
   ``instance.run_instance`` on the descriptors. Everything else an instance needs (the
   Redis URL, the secret) comes over its own pipe, from the dispatcher.
3. End of file on the control connection (the client closed it, or died) stops the
   server, which kills the instances still alive: they have lost their dispatcher.

The server reaps its children as SIGCHLD arrives, so a dead instance's cgroup can be
removed at once, and sends ``(EXITED, pid, exit code)`` (negative: the signal that killed
it, as ``multiprocessing`` reports it) on the control connection. The client is not the
instances' parent; it watches each one through a pidfd (``InstanceProcess``) and reads its
exit code from those messages. One server serves every local backend of a process
(``shared_fork_server``), as multiprocessing's does: a second Scheduler starts no server.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection

FORK = "fork"
EXITED = "exited"
# Modules worth importing once in the server when the client already uses them.
PRELOAD_IF_LOADED = ("numpy", "pandas", "dask.array", "dask.bag", "dask.dataframe")
_SERVER_MODULE = "dask_serverless.backends.local"
# The most descriptors one instance is started with (its pipe, its task slot).
_MAX_FDS = 2
_POLL_S = 0.01


class ForkServerError(RuntimeError):
    """The fork server is gone or could not start an instance."""


class InstanceProcess:
    """A handle on an instance: a process the client did not start itself.

    Linux gives a pidfd, which becomes readable when the process exits (whoever reaps
    it); elsewhere liveness is polled with signal 0.
    """

    def __init__(self, pid: int, server: ForkServer | None = None) -> None:
        self.pid = pid
        self._server = server
        self._pidfd: int | None = None
        self._exited = False
        if hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._exited = True

    def is_alive(self) -> bool:
        return not self._wait(0.0)

    def join(self, timeout: float | None = None) -> None:
        self._wait(timeout)

    @property
    def exitcode(self) -> int | None:
        """None while it runs; then its exit code (negative: the signal that killed it)."""
        if not self.is_alive() and self._server is not None:
            return self._server.exit_code(self.pid)
        return None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            elif not self._exited:
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd (the process is gone or no longer watched)."""
        if self._server is not None:
            self._server.forget(self.pid)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
            self._exited = True

    def _wait(self, timeout: float | None) -> bool:
        """Whether the process exited, waiting up to ``timeout`` seconds (None: forever)."""
        if self._exited:
            return True
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd], [], [], timeout)
            return bool(readable)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self._exited = True
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


def _loaded_preloads() -> list[str]:
    return [name for name in PRELOAD_IF_LOADED if name in sys.modules]


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the client's directory was deleted
        return None


class ForkServer:
    """The client's end of a fork server (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        own_end, server_end = socket.socketpair()
        self._socket = own_end
        self._connection = Connection(os.dup(own_end.fileno()))
        self._lock = threading.Lock()
        self._exit_codes: dict[int, int] = {}
        self.owner = os.getpid()
        with server_end:
            self.process = subprocess.Popen(
                [sys.executable, "-m", _SERVER_MODULE, str(server_end.fileno())],
                pass_fds=(server_end.fileno(),),
                stdin=subprocess.DEVNULL,
                # Out of the terminal's process group: Ctrl-C interrupts the client, whose
                # clean-up stops the instances, not the platform underneath it.
                start_new_session=True,
            )
        self._connection.send((list(sys.path), _cwd(), _loaded_preloads()))

    def alive(self) -> bool:
        return self.process.poll() is None and os.getpid() == self.owner

    def fork(self, fds: Sequence[int]) -> InstanceProcess:
        """Start an instance on ``fds`` (its pipe, its task slot); returns its handle."""
        request = (FORK, list(sys.path), _cwd(), _loaded_preloads())
        with self._lock:
            try:
                self._connection.send(request)
                reduction.sendfds(self._socket, list(fds))
                reply = self._connection.recv()
                while isinstance(reply, tuple):
                    self._note_exit(reply)
                    reply = self._connection.recv()
            except (EOFError, OSError) as error:
                raise ForkServerError(
                    f"the local platform's fork server exited (status {self.process.poll()})"
                ) from error
        if isinstance(reply, str):
            raise ForkServerError(f"the local platform could not start an instance: {reply}")
        return InstanceProcess(int(reply), self)

    def exit_code(self, pid: int, timeout: float = 1.0) -> int | None:
        """The exit code of instance ``pid``, which exited (None: the server did not say)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            with contextlib.suppress(EOFError, OSError):
                while pid not in self._exit_codes:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._connection.poll(remaining):
                        break
                    self._note_exit(self._connection.recv())
            return self._exit_codes.get(pid)

    def forget(self, pid: int) -> None:
        with self._lock:
            self._exit_codes.pop(pid, None)

    def _note_exit(self, message: tuple) -> None:
        _, pid, code = message
        self._exit_codes[int(pid)] = int(code)

    def close(self) -> None:
        """Stop the server (it kills the instances it still has) and wait for it."""
        self._connection.close()
        self._socket.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _SharedForkServer:
    """The process's fork server, started by the first local backend that needs one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ForkServer | None = None

    def get(self) -> ForkServer:
        with self._lock:
            if self._server is None or not self._server.alive():
                self._server = ForkServer()
            return self._server


_shared = _SharedForkServer()


def shared_fork_server() -> ForkServer:
    """This process's fork server; a new one if it has none yet, or it died."""
    return _shared.get()


# -- the server side: ``python -m dask_serverless.backends.local <fd>`` -------------------


def _import(modules: Sequence[str]) -> None:
    for name in modules:
        if name not in sys.modules:
            with contextlib.suppress(ImportError):
                __import__(name)


def _enter(sys_path: list[str], cwd: str | None) -> None:
    sys.path[:] = sys_path
    if cwd is not None:
        with contextlib.suppress(OSError):
            os.chdir(cwd)


def serve_forever(control_fd: int) -> None:
    """Fork instances on request until the control connection closes."""
    from dask_serverless.backends.local.instance import run_instance

    control = socket.socket(fileno=control_fd)
    connection = Connection(os.dup(control_fd))
    try:
        sys_path, cwd, modules = connection.recv()
    except EOFError:
        return
    _enter(sys_path, cwd)
    _import(modules)
    wake_reader, wake_writer = os.pipe()
    os.set_blocking(wake_reader, False)
    os.set_blocking(wake_writer, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_writer)
    children: set[int] = set()
    try:
        while True:
            readable, _, _ = select.select([control.fileno(), wake_reader], [], [])
            if wake_reader in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_reader, 4096)
                _reap(children, connection)
            if control.fileno() not in readable:
                continue
            try:
                _, sys_path, cwd, modules = connection.recv()
                fds = reduction.recvfds(control, _MAX_FDS)
            except (EOFError, OSError):
                return
            _import(modules)
            # What the instance inherits (the imported stack) is never garbage: frozen, its
            # collector skips it, and a full collection in an instance no longer walks
            # a hundred thousand module objects (tens of ms, in the middle of a task).
            gc.freeze()
            try:
                pid = os.fork()
            except OSError as error:
                connection.send(f"fork failed: {error}")
                _close_all(fds)
                continue
            if pid == 0:
                code = 1
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    _close_all([wake_reader, wake_writer])
                    connection.close()
                    control.close()
                    _enter(sys_path, cwd)
                    code = run_instance(fds)
                except BaseException:
                    traceback.print_exc()
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            children.add(pid)
            _close_all(fds)
            with contextlib.suppress(OSError):
                connection.send(pid)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _reap(children: set[int], connection: Connection) -> None:
    """Collect the instances that exited; tell the client their exit codes."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):
            connection.send((EXITED, pid, os.waitstatus_to_exitcode(status)))


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
