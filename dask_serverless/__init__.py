"""Run ordinary Dask graphs on serverless workers that coordinate only through Redis.

>>> import dask, dask_serverless
>>> dask.compute(x, scheduler=dask_serverless.get)  # doctest: +SKIP
"""

from dask_serverless import config as _config  # noqa: F401  (registers the defaults)
from dask_serverless._version import __version__
from dask_serverless.client import (
    RedisUnavailableError,
    Scheduler,
    StuckRunError,
    WorkerCrashedError,
    get,
)
from dask_serverless.graph import CycleError
from dask_serverless.performance import performance_report
from dask_serverless.protocol.events import TaskOutOfMemoryError
from dask_serverless.report import RunReport
from dask_serverless.storage.serialize import RemoteError, UntrustedBlobError

__all__ = [
    "CycleError",
    "RedisUnavailableError",
    "RemoteError",
    "RunReport",
    "Scheduler",
    "StuckRunError",
    "TaskOutOfMemoryError",
    "UntrustedBlobError",
    "WorkerCrashedError",
    "__version__",
    "get",
    "performance_report",
]
