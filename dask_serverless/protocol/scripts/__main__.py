"""``python -m dask_serverless.protocol.scripts NAME``: print a script for ``redis-cli --eval``."""

import sys

from dask_serverless.protocol.scripts import NAMES, source

if len(sys.argv) != 2 or sys.argv[1] not in NAMES:
    sys.exit(f"usage: python -m dask_serverless.protocol.scripts {{{'|'.join(NAMES)}}}")
sys.stdout.write(source(sys.argv[1]))
