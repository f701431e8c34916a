"""The local platform's fork server: ``python -m dask_serverless.backends.local <fd>``.

Started by ``backends.local.forkserver.ForkServer``; ``<fd>`` is its end of the control
connection. See that module for the protocol.
"""

import sys

from dask_serverless.backends.local.forkserver import serve_forever

if __name__ == "__main__":
    serve_forever(int(sys.argv[1]))
