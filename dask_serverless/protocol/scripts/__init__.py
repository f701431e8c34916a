"""The Lua scripts of the run protocol, shipped as package data.

Each ``<name>.lua`` runs with ``prelude.lua`` in front of it (``alive()``, ``now_ms()``,
the event and signal helpers). ``source(name)`` is the whole script as Redis runs it;
``python -m dask_serverless.protocol.scripts complete > complete.lua`` writes one out to
run by hand: ``redis-cli --eval complete.lua KEYS… , ARGS…``.
"""

from __future__ import annotations

import functools
from importlib import resources

NAMES = (
    "begin",
    "renew",
    "release",
    "lapsed",
    "complete",
    "append_events",
    "fail",
    "seal",
    "announce",
    "queue",
)


@functools.cache
def source(name: str) -> str:
    """The prelude followed by script ``name``."""
    if name not in NAMES:
        raise ValueError(f"no script {name!r}; the scripts are {', '.join(NAMES)}")
    folder = resources.files(__package__)
    prelude = folder.joinpath("prelude.lua").read_text()
    return prelude + "\n" + folder.joinpath(f"{name}.lua").read_text()
