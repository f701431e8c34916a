"""The live dashboard: a bokeh server app over the run history and the runs' event streams.

``dask-serverless dashboard --redis URL`` serves it until interrupted;
``Scheduler(dashboard=True)`` (or ``serverless.dashboard.enabled``) starts one beside the
client, in a thread of its own, and prints its address — as distributed prints its
dashboard link. Like Dask's own dashboard it is a bokeh server: every browser tab gets a
document that refreshes itself from Redis (``watch.RunWatcher``), reading only what the
Scheduler and the workers write anyway. It listens on 127.0.0.1 unless told otherwise:
the page shows task keys and run ids, which are not for everyone on the network.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from dask_serverless import config
from dask_serverless.protocol.runs import RunHistory
from dask_serverless.protocol.store import client_for

__all__ = ["Dashboard", "start_dashboard"]

_START_TIMEOUT_S = 30


class Dashboard:
    """A bokeh server for the runs on ``redis_url``, run in a daemon thread.

    ``port=0`` picks a free port; ``url`` says where it listens once started.
    """

    def __init__(self, redis_url: str, port: int = 0, address: str = "127.0.0.1") -> None:
        self.redis_url = redis_url
        self.address = address
        self.requested_port = port
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, name="dask-serverless-dashboard", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/"

    def start(self) -> Dashboard:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError("the dashboard did not start")
        if self._failure is not None:
            raise RuntimeError(f"the dashboard did not start: {self._failure}") from self._failure
        return self

    def _watcher(self) -> Any:
        from dask_serverless.dashboard.watch import RunWatcher

        client = client_for(self.redis_url)
        keep = max(1, int(config.setting("history.runs")))
        history = RunHistory(client, keep, int(config.setting("planning.history-ttl")))
        return RunWatcher(client, history, int(config.setting("run-ttl")))

    def _serve(self) -> None:
        from bokeh.application import Application
        from bokeh.application.handlers.function import FunctionHandler
        from bokeh.server.server import Server
        from tornado.ioloop import IOLoop

        from dask_serverless.dashboard.app import make_document

        try:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._server = Server(
                {"/": Application(FunctionHandler(make_document(self._watcher)))},
                io_loop=IOLoop.current(),
                address=self.address,
                port=self.requested_port,
                allow_websocket_origin=[self.address, "localhost", "127.0.0.1"],
                check_unused_sessions_milliseconds=2000,
                unused_session_lifetime_milliseconds=5000,
            )
            self._server.start()
            self.port = self._server.port
        except BaseException as error:
            self._failure = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._server.stop()
        self._loop.close()

    def serve_forever(self) -> None:
        """Block until interrupted (the command line's mode)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        """Stop the server and its thread."""
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)


def start_dashboard(redis_url: str, port: int, address: str = "127.0.0.1") -> Dashboard:
    """A started dashboard on ``port``, or on a free port when that one is taken."""
    try:
        return Dashboard(redis_url, port, address).start()
    except RuntimeError as error:
        if not isinstance(error.__cause__, OSError):
            raise
        return Dashboard(redis_url, 0, address).start()
