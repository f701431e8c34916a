"""The contract the client, the workers and the backends keep.

Everything both sides of a run must agree on lives here and nowhere else: the run record
and how blobs are signed (``record``), the invocation payload (``invocation``), the Redis
key names (``keys``), the event records (``events``), where a task's output must go
(``placement``), and every Redis command with its Lua script (``store``, ``history``,
``scripts/``). This package imports nothing of ours but ``graph``, ``constants`` and
``storage.serialize``; the client, the workers, the planner and the backends import it.
"""
