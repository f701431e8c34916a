"""The local platform: a pool of worker processes that behaves like AWS Lambda.

``platform`` is the dispatcher (the platform's API and its scheduling of instances),
``forkserver`` the process instances are forked from (``python -m`` this package runs it),
``instance`` the entry point each instance runs, ``queue`` the invocations waiting for an
instance, ``resources`` the cgroup limits that give each configuration its CPU share and
memory.
"""

from dask_serverless.backends.local.instance import InstanceSettings, LocalContext
from dask_serverless.backends.local.platform import LocalBackend

__all__ = ["InstanceSettings", "LocalBackend", "LocalContext"]
