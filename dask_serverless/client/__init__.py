"""The client: what runs in the user's process.

``scheduler`` is the long-lived ``Scheduler`` façade (and ``get``, the embedded
default); ``run`` is one compute from submission to result; ``progress`` folds a run's
events into its outcome and the dask callbacks; ``bundling`` groups roots into bundles.
"""

from dask_serverless.client.run import RedisUnavailableError, StuckRunError, WorkerCrashedError
from dask_serverless.client.scheduler import Scheduler, get
from dask_serverless.client.scheduler import _default as _default

__all__ = ["RedisUnavailableError", "Scheduler", "StuckRunError", "WorkerCrashedError", "get"]
